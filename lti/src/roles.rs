//! LTI roles → Viva access levels.
//!
//! Context roles decide what a user may do in the course: Instructor,
//! TeachingAssistant (a sub-role of Instructor), ContentDeveloper, Manager
//! and context Administrator manage it; Learner (and every other or unknown
//! role) gets the least privilege, a learner's. Full URIs, LTI 1.3 short
//! names, sub-roles (`membership/Instructor#TeachingAssistant`) and LTI 1.1
//! URNs are understood. Institution and system administrators are Viva
//! administrators; institution roles such as `institution/person#Instructor`
//! grant nothing in a course.

use serde::{Deserialize, Serialize};

/// What a launched user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Learner,
    Instructor,
    Admin,
}

const MEMBERSHIP: &str = "http://purl.imsglobal.org/vocab/lis/v2/membership";
const INSTITUTION: &str = "http://purl.imsglobal.org/vocab/lis/v2/institution/person";
const SYSTEM: &str = "http://purl.imsglobal.org/vocab/lis/v2/system/person";

fn instructor_like(name: &str) -> bool {
    matches!(
        name,
        "Instructor" | "TeachingAssistant" | "ContentDeveloper" | "Manager" | "Administrator"
    )
}

/// One role's access, if it grants any.
pub fn classify(role: &str) -> Option<Access> {
    let role = role.trim();
    if role.is_empty() {
        return None;
    }
    // System and institution roles.
    if let Some(name) = role
        .strip_prefix(SYSTEM)
        .or_else(|| role.strip_prefix(INSTITUTION))
        .and_then(|r| r.strip_prefix('#'))
    {
        return matches!(name, "Administrator" | "SysAdmin" | "AccountAdmin")
            .then_some(Access::Admin);
    }
    if let Some(name) = role
        .strip_prefix("urn:lti:sysrole:ims/lis/")
        .or_else(|| role.strip_prefix("urn:lti:instrole:ims/lis/"))
    {
        return matches!(name, "Administrator" | "SysAdmin" | "AccountAdmin")
            .then_some(Access::Admin);
    }
    // Context roles: full URI, sub-role URI, LTI 1.1 URN or short name.
    let name = if let Some(rest) = role.strip_prefix(MEMBERSHIP) {
        // "#Instructor" or "/Instructor#TeachingAssistant": the principal role decides.
        let rest = rest.trim_start_matches(['#', '/']);
        rest.split('#').next().unwrap_or(rest)
    } else if let Some(rest) = role.strip_prefix("urn:lti:role:ims/lis/") {
        rest.split('/').next().unwrap_or(rest)
    } else if !role.contains(':') && !role.contains('/') {
        // Short form; a sub-role short form is "Instructor#TeachingAssistant".
        role.split('#').next().unwrap_or(role)
    } else {
        return None;
    };
    if instructor_like(name) {
        Some(Access::Instructor)
    } else if name == "Learner" {
        Some(Access::Learner)
    } else {
        None
    }
}

/// The access levels of a role list. Unknown and empty lists are a learner.
pub fn map_roles<S: AsRef<str>>(roles: &[S]) -> Vec<Access> {
    let mut out: Vec<Access> = roles.iter().filter_map(|r| classify(r.as_ref())).collect();
    if !out
        .iter()
        .any(|a| matches!(a, Access::Learner | Access::Instructor))
    {
        out.push(Access::Learner);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::*;

    #[test]
    fn context_roles_in_every_form() {
        for (role, want) in [
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor",
                Some(Instructor),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership/Instructor#TeachingAssistant",
                Some(Instructor),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership#ContentDeveloper",
                Some(Instructor),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership#Administrator",
                Some(Instructor),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership#Learner",
                Some(Learner),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership/Learner#Learner",
                Some(Learner),
            ),
            ("Instructor", Some(Instructor)),
            ("TeachingAssistant", Some(Instructor)),
            ("Instructor#TeachingAssistant", Some(Instructor)),
            ("Learner", Some(Learner)),
            ("urn:lti:role:ims/lis/Instructor", Some(Instructor)),
            (
                "urn:lti:role:ims/lis/TeachingAssistant/TeachingAssistantSection",
                Some(Instructor),
            ),
            ("urn:lti:role:ims/lis/Learner", Some(Learner)),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership#Mentor",
                None,
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Instructor",
                None,
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Student",
                None,
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator",
                Some(Admin),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/system/person#SysAdmin",
                Some(Admin),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/system/person#Administrator",
                Some(Admin),
            ),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/system/person#User",
                None,
            ),
            ("urn:lti:sysrole:ims/lis/SysAdmin", Some(Admin)),
            ("urn:lti:instrole:ims/lis/Administrator", Some(Admin)),
            ("https://evil.example.com/roles#Instructor", None),
            (
                "http://purl.imsglobal.org/vocab/lis/v2/membership#InstructorX",
                None,
            ),
            ("", None),
        ] {
            assert_eq!(classify(role), want, "{role}");
        }
    }

    #[test]
    fn lists_default_to_least_privilege() {
        assert_eq!(map_roles::<&str>(&[]), vec![Learner]);
        assert_eq!(map_roles(&["nonsense", "urn:x"]), vec![Learner]);
        assert_eq!(
            map_roles(&[
                "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor",
                "Learner"
            ]),
            vec![Learner, Instructor]
        );
        assert_eq!(
            map_roles(&["http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator"]),
            vec![Learner, Admin]
        );
    }
}
