//! `viva platform add | invite | list | remove`: LTI 1.3 platform
//! registrations in the local database (the daemon reads them on every login, so no restart
//! is needed).

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use viva_lti::Registration;

use crate::config::Config;
use crate::lti;

#[derive(Subcommand, Debug)]
pub enum PlatformAction {
    /// Register a platform (values from its LTI 1.3 tool configuration page).
    Add {
        /// The platform's issuer, e.g. https://canvas.instructure.com or your Moodle's URL.
        #[arg(long)]
        issuer: String,
        /// The client id the platform assigned to Viva.
        #[arg(long)]
        client_id: String,
        /// The platform's OIDC authorization endpoint.
        #[arg(long)]
        auth_url: String,
        /// The platform's OAuth 2 token endpoint.
        #[arg(long)]
        token_url: String,
        /// The platform's public keyset (JWKS) URL.
        #[arg(long)]
        jwks_url: String,
        /// An accepted deployment id (repeat for several).
        #[arg(long = "deployment", required = true)]
        deployments: Vec<String>,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// The client assertion audience, when it is not the token URL.
        #[arg(long)]
        token_audience: Option<String>,
        /// Another origin allowed to frame Viva (e.g. a Canvas instance's domain).
        #[arg(long = "frame-origin")]
        frame_origins: Vec<String>,
        /// Replace an existing registration with the same issuer and client id.
        #[arg(long)]
        replace: bool,
    },
    /// Print a one-time dynamic registration URL (valid an hour) to paste
    /// into the platform. Dynamic registration works only through these.
    Invite {
        /// The only issuer the registration may have; needed when the
        /// platform's issuer lives on another host than its configuration
        /// (hosted Canvas: https://canvas.instructure.com).
        #[arg(long)]
        issuer: Option<String>,
    },
    /// List registrations.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a registration (launches from it stop working at once).
    Remove {
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        client_id: String,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(action: &PlatformAction, config: &Config) -> anyhow::Result<ExitCode> {
    let store = lti::open_store(config)?;
    let rt = runtime()?;
    match action {
        PlatformAction::Add {
            issuer,
            client_id,
            auth_url,
            token_url,
            jwks_url,
            deployments,
            name,
            token_audience,
            frame_origins,
            replace,
        } => {
            let reg = Registration {
                issuer: issuer.clone(),
                client_id: client_id.clone(),
                name: name.clone(),
                auth_login_url: auth_url.clone(),
                auth_token_url: token_url.clone(),
                auth_token_audience: token_audience.clone(),
                key_set_url: jwks_url.clone(),
                deployments: deployments.clone(),
                algorithms: vec![],
                frame_origins: frame_origins.clone(),
            };
            reg.validate(config.lti.policy()).with_context(|| {
                if config.lti.allow_insecure_platforms {
                    String::from("invalid registration")
                } else {
                    String::from(
                        "invalid registration (http and private addresses need \
                         lti.allow_insecure_platforms = true, for development only)",
                    )
                }
            })?;
            let replace = *replace;
            let r = reg.clone();
            rt.block_on(store.write(move |tx| {
                lti::save_registration(tx, &r, "manual", replace)?;
                crate::domain::audit(
                    tx,
                    "cli",
                    "platform.add",
                    &r.issuer,
                    serde_json::json!({ "client_id": r.client_id }),
                )
            }))?;
            println!(
                "registered {} (client id {}) with {} deployment(s)",
                reg.issuer,
                reg.client_id,
                reg.deployments.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        PlatformAction::Invite { issuer } => {
            let tool = viva_lti::ToolUrls::new(&config.public_url())?;
            let issuer = issuer.clone();
            let invite = rt.block_on(
                store.write(move |tx| lti::create_invite(tx, &tool, "cli", issuer.as_deref())),
            )?;
            println!("{}", invite.url);
            eprintln!(
                "paste this URL into the platform's dynamic registration within {} minutes; \
                 it works once{}",
                lti::INVITE_TTL_SECS / 60,
                invite
                    .issuer
                    .map(|i| format!(", for the issuer {i}"))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        PlatformAction::List { json } => {
            let regs = rt.block_on(store.read(lti::list_registrations))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&regs)?);
            } else if regs.is_empty() {
                println!(
                    "no platforms registered (viva platform add, or dynamic registration with a URL from viva platform invite)"
                );
            } else {
                for r in regs {
                    let reg = &r.registration;
                    println!(
                        "{}  client {}  deployments [{}]  ({}, {})",
                        reg.issuer,
                        reg.client_id,
                        reg.deployments.join(", "),
                        if reg.name.is_empty() { "-" } else { &reg.name },
                        r.source
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PlatformAction::Remove { issuer, client_id } => {
            let (i, c) = (issuer.clone(), client_id.clone());
            let removed = rt.block_on(store.write(move |tx| {
                let removed = lti::remove_registration(tx, &i, &c)?;
                if removed {
                    crate::domain::audit(
                        tx,
                        "cli",
                        "platform.remove",
                        &i,
                        serde_json::json!({ "client_id": c }),
                    )?;
                }
                Ok(removed)
            }))?;
            if !removed {
                bail!("no registration for {issuer} with client id {client_id}");
            }
            println!("removed {issuer} (client id {client_id})");
            Ok(ExitCode::SUCCESS)
        }
    }
}
