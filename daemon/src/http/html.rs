//! HTML: escaping, the headers every page shares, the widget's shell and the
//! small self-contained pages of the LTI flow.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const CSS: &str = "body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1b1b1b}\
main{max-width:46rem;margin:0 auto;padding:1.5rem}\
code{background:#f2f2f2;padding:.1rem .3rem;border-radius:3px;word-break:break-all}\
button,.button{font:inherit;padding:.4rem .9rem;border:1px solid #2a5db0;background:#2a5db0;color:#fff;border-radius:4px;cursor:pointer;text-decoration:none;display:inline-block}\
li{margin:.4rem 0}label{display:block;margin:.5rem 0 .2rem}input,textarea{font:inherit;width:100%;box-sizing:border-box}\
.error{border-left:4px solid #b00020;padding-left:1rem}[hidden]{display:none}";

/// HTML-escapes text for element content and quoted attributes.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub(super) struct Page {
    pub status: StatusCode,
    pub title: String,
    pub body: String,
    /// JSON handed to the script (`#viva-data`).
    pub data: Option<serde_json::Value>,
    pub script: Option<&'static str>,
    /// Origins allowed to frame the page; empty = any (harmless pages only).
    pub frame_ancestors: Option<Vec<String>>,
    pub form_action: Vec<String>,
    pub headers: Vec<(HeaderName, String)>,
}

impl Page {
    pub fn new(title: impl Into<String>, body: String) -> Page {
        Page {
            status: StatusCode::OK,
            title: title.into(),
            body,
            data: None,
            script: None,
            frame_ancestors: None,
            form_action: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn render(self) -> Response {
        let nonce = viva_lti::login::random_token(16);
        let data = self
            .data
            .as_ref()
            .map(|d| {
                format!(
                    "<script type=\"application/json\" id=\"viva-data\">{}</script>",
                    script_json(d)
                )
            })
            .unwrap_or_default();
        let script = self
            .script
            .map(|s| format!("<script nonce=\"{nonce}\">{s}</script>"))
            .unwrap_or_default();
        let html = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{}</title><style>{CSS}</style></head><body><main>{}</main>{data}{script}</body></html>",
            esc(&self.title),
            self.body
        );
        let ancestors = match &self.frame_ancestors {
            None => "*".to_owned(),
            Some(list) => {
                let mut s = "'self'".to_owned();
                for o in list {
                    s.push(' ');
                    s.push_str(o);
                }
                s
            }
        };
        let mut form_action = "'self'".to_owned();
        for o in &self.form_action {
            form_action.push(' ');
            form_action.push_str(o);
        }
        let csp = format!(
            "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action {form_action}; \
             frame-ancestors {ancestors}; base-uri 'none'"
        );
        let mut resp = html_page(self.status, html, &csp);
        let h = resp.headers_mut();
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.append(name, v);
            }
        }
        resp
    }
}

/// JSON safe inside `<script type="application/json">`.
pub(super) fn script_json(v: &serde_json::Value) -> String {
    v.to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// The widget's page: `data` (token, assignment, roles …) for the script;
/// `frame_ancestors` the origins that may frame it (`None`: only this origin);
/// `locale` the widget's language when the launch or the browser's
/// Accept-Language named one it has (`None`: the script asks the browser;
/// the page says English until then). It is also `data.locale`.
pub(super) fn shell(
    title: &str,
    mut data: serde_json::Value,
    frame_ancestors: Option<&[String]>,
    locale: Option<&str>,
) -> Response {
    let nonce = viva_lti::login::random_token(16);
    let v = super::widget::version();
    if let (Some(l), Some(obj)) = (locale, data.as_object_mut()) {
        obj.insert("locale".into(), l.into());
    }
    let html = format!(
        "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/widget/{v}/style.css\"></head>\
         <body><div id=\"viva-app\" class=\"viva\"><noscript>Viva needs JavaScript: turn it on \
         for this site and reload.</noscript></div>\
         <script type=\"application/json\" id=\"viva-data\">{}</script>\
         <script type=\"module\" nonce=\"{nonce}\" src=\"/widget/{v}/app.js\"></script></body></html>",
        esc(locale.unwrap_or("en")),
        esc(title),
        script_json(&data)
    );
    let ancestors = match frame_ancestors {
        None => "'self'".to_owned(),
        Some(list) => {
            let mut s = "'self'".to_owned();
            for o in list {
                s.push(' ');
                s.push_str(o);
            }
            s
        }
    };
    let csp = format!(
        "default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self'; \
         connect-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; \
         form-action 'none'; frame-ancestors {ancestors}; base-uri 'none'"
    );
    html_page(StatusCode::OK, html, &csp)
}

/// An HTML page that is never cached, sends no referrer, is not sniffed and
/// carries `csp`: the headers every page of the daemon (widget shell, LTI
/// pages) shares.
pub(super) fn html_page(status: StatusCode, html: String, csp: &str) -> Response {
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_data_cannot_close_its_script_element() {
        let s = script_json(&serde_json::json!({"t": "</script><script>alert(1)</script>"}));
        assert!(!s.contains('<'));
    }

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let v = serde_json::json!({"t": "</script><script>alert(1)</script>"});
        assert!(!script_json(&v).contains("</script>"));
    }
}
