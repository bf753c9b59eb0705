//! Validation of plugin configurations against the plugin's JSON Schema.
//!
//! Viva supports the part of JSON Schema (draft 2020-12) that describes a
//! settings form, which is also what the web widget turns into a form:
//!
//! - `type` (`object`, `array`, `string`, `number`, `integer`, `boolean`,
//!   `null`, or a list of them), `enum`, `const`;
//! - numbers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`,
//!   `multipleOf`; strings: `minLength`, `maxLength`;
//! - objects: `properties`, `required`, `additionalProperties` (boolean or a
//!   schema), `minProperties`, `maxProperties`;
//! - arrays: `items` (one schema), `minItems`, `maxItems`, `uniqueItems`;
//! - annotations, which do not constrain: `title`, `description`, `default`,
//!   `examples`, `deprecated`, `readOnly`, `writeOnly`, `format`, `$schema`,
//!   `$id`, `$comment`, and any `x-…` key (form hints).
//!
//! A plugin whose schema uses anything else (`$ref`, `oneOf`, `pattern`, …)
//! is refused at upload with a message naming the keyword, so a schema never
//! silently means less than its author thought. Checks a plugin needs beyond
//! this belong in its `validate-config`. A small validator instead of a
//! general JSON Schema crate keeps the daemon's build and behaviour small.

use serde_json::{Map, Value};

/// A checked configuration schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    root: Value,
}

const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "format",
];

const KEYWORDS: &[&str] = &[
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
];

const TYPES: &[&str] = &[
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// At most this many problems are reported at once.
const MAX_ERRORS: usize = 5;

impl Schema {
    /// A schema that accepts any object.
    pub fn any() -> Schema {
        Schema {
            root: serde_json::json!({"type": "object"}),
        }
    }

    /// Checks that `schema` uses only supported keywords and describes an
    /// object.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        check(schema, "#")?;
        if let Some(t) = schema.get("type")
            && t != "object"
        {
            return Err(format!(
                "the top-level type must be \"object\" (a configuration is a JSON object), not {t}"
            ));
        }
        Ok(Schema {
            root: schema.clone(),
        })
    }

    pub fn as_json(&self) -> &Value {
        &self.root
    }

    /// Checks a configuration; the error lists the first few problems,
    /// each naming the setting.
    pub fn validate(&self, instance: &Value) -> Result<(), String> {
        let mut errors = Vec::new();
        validate(&self.root, instance, "", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn check(schema: &Value, at: &str) -> Result<(), String> {
    let map = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(m) => m,
        other => {
            return Err(format!(
                "{at}: a schema must be an object or a boolean, not {other}"
            ));
        }
    };
    for (key, value) in map {
        if key.starts_with("x-") || ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        let bad = |what: &str| Err(format!("{at}/{key}: must be {what}"));
        match key.as_str() {
            "type" => {
                let ok = match value {
                    Value::String(s) => TYPES.contains(&s.as_str()),
                    Value::Array(a) => {
                        !a.is_empty()
                            && a.iter()
                                .all(|t| t.as_str().is_some_and(|s| TYPES.contains(&s)))
                    }
                    _ => false,
                };
                if !ok {
                    return bad(
                        "a type name or a list of them (object, array, string, number, integer, boolean, null)",
                    );
                }
            }
            "enum" => {
                if value.as_array().is_none_or(|a| a.is_empty()) {
                    return bad("a non-empty array");
                }
            }
            "const" => {}
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" => {
                if !value.is_number() {
                    return bad("a number");
                }
            }
            "multipleOf" => {
                if !value.as_f64().is_some_and(|x| x > 0.0) {
                    return bad("a positive number");
                }
            }
            "minLength" | "maxLength" | "minProperties" | "maxProperties" | "minItems"
            | "maxItems" => {
                if value.as_u64().is_none() {
                    return bad("a non-negative integer");
                }
            }
            "uniqueItems" => {
                if !value.is_boolean() {
                    return bad("true or false");
                }
            }
            "required" => {
                if !value
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string))
                {
                    return bad("an array of property names");
                }
            }
            "properties" => {
                let Some(props) = value.as_object() else {
                    return bad("an object of schemas");
                };
                for (name, sub) in props {
                    check(sub, &format!("{at}/properties/{name}"))?;
                }
            }
            "additionalProperties" | "items" => check(value, &format!("{at}/{key}"))?,
            other => {
                return Err(format!(
                    "{at}: the keyword {other:?} is not supported; Viva's configuration schemas use {} \
                     (plus annotations); check anything else in validate-config",
                    KEYWORDS.join(", ")
                ));
            }
        }
    }
    Ok(())
}

fn name(path: &str) -> String {
    if path.is_empty() {
        "the configuration".to_owned()
    } else {
        path.to_owned()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// JSON equality where 1 and 1.0 are the same number.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn validate(schema: &Value, v: &Value, path: &str, errors: &mut Vec<String>) {
    if errors.len() >= MAX_ERRORS {
        return;
    }
    let map: &Map<String, Value> = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{} is not allowed", name(path)));
            return;
        }
        Value::Object(m) => m,
        _ => return,
    };
    if let Some(t) = map.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| is_type(v, t)) {
            errors.push(format!(
                "{}: expected {}, got {}",
                name(path),
                types
                    .iter()
                    .map(|t| match *t {
                        "integer" => "an integer",
                        "object" => "an object",
                        "array" => "an array",
                        "string" => "a string",
                        "number" => "a number",
                        "boolean" => "true or false",
                        _ => "null",
                    })
                    .collect::<Vec<_>>()
                    .join(" or "),
                kind(v)
            ));
            return;
        }
    }
    if let Some(options) = map.get("enum").and_then(Value::as_array)
        && !options.iter().any(|o| json_eq(o, v))
    {
        let list: Vec<String> = options.iter().map(Value::to_string).collect();
        errors.push(format!(
            "{}: {v} is not one of {}",
            name(path),
            list.join(", ")
        ));
    }
    if let Some(c) = map.get("const")
        && !json_eq(c, v)
    {
        errors.push(format!("{}: must be {c}", name(path)));
    }
    if let Some(x) = v.as_f64() {
        let num = |k: &str| map.get(k).and_then(Value::as_f64);
        if let Some(m) = num("minimum")
            && x < m
        {
            errors.push(format!(
                "{}: {v} is less than the minimum of {m}",
                name(path)
            ));
        }
        if let Some(m) = num("maximum")
            && x > m
        {
            errors.push(format!(
                "{}: {v} is greater than the maximum of {m}",
                name(path)
            ));
        }
        if let Some(m) = num("exclusiveMinimum")
            && x <= m
        {
            errors.push(format!("{}: {v} must be greater than {m}", name(path)));
        }
        if let Some(m) = num("exclusiveMaximum")
            && x >= m
        {
            errors.push(format!("{}: {v} must be less than {m}", name(path)));
        }
        if let Some(m) = num("multipleOf") {
            let q = x / m;
            if (q - q.round()).abs() > 1e-9 {
                errors.push(format!("{}: {v} is not a multiple of {m}", name(path)));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(m) = map.get("minLength").and_then(Value::as_u64)
            && len < m
        {
            errors.push(format!("{}: must be at least {m} characters", name(path)));
        }
        if let Some(m) = map.get("maxLength").and_then(Value::as_u64)
            && len > m
        {
            errors.push(format!("{}: must be at most {m} characters", name(path)));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = map.get("properties").and_then(Value::as_object);
        if let Some(required) = map.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(format!("{}: {r:?} is required", name(path)));
                }
            }
        }
        for (key, value) in obj {
            match props.and_then(|p| p.get(key)) {
                Some(sub) => validate(sub, value, &child(path, key), errors),
                None => match map.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        let known: Vec<&str> = props
                            .map(|p| p.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        errors.push(format!(
                            "{}: unknown setting {key:?} (known: {})",
                            name(path),
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ));
                    }
                    Some(sub) => validate(sub, value, &child(path, key), errors),
                    None => {}
                },
            }
        }
        let n = obj.len() as u64;
        if let Some(m) = map.get("minProperties").and_then(Value::as_u64)
            && n < m
        {
            errors.push(format!("{}: needs at least {m} settings", name(path)));
        }
        if let Some(m) = map.get("maxProperties").and_then(Value::as_u64)
            && n > m
        {
            errors.push(format!("{}: allows at most {m} settings", name(path)));
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(sub) = map.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate(sub, item, &format!("{}[{i}]", path), errors);
            }
        }
        let n = items.len() as u64;
        if let Some(m) = map.get("minItems").and_then(Value::as_u64)
            && n < m
        {
            errors.push(format!("{}: needs at least {m} items", name(path)));
        }
        if let Some(m) = map.get("maxItems").and_then(Value::as_u64)
            && n > m
        {
            errors.push(format!("{}: allows at most {m} items", name(path)));
        }
        if map.get("uniqueItems") == Some(&Value::Bool(true)) {
            for (i, a) in items.iter().enumerate() {
                if items[..i].iter().any(|b| json_eq(a, b)) {
                    errors.push(format!("{}: {a} appears more than once", name(path)));
                    break;
                }
            }
        }
    }
    errors.truncate(MAX_ERRORS);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "additionalProperties": false,
            "x-form-order": ["combine"],
            "properties": {
                "combine": {"type": "string", "enum": ["mean", "min", "max"], "default": "mean"},
                "gap": {"type": "integer", "minimum": 0, "maximum": 10},
                "share": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "bands": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["label"],
                    "properties": {"label": {"type": "string", "minLength": 1}}
                }}
            }
        }))
        .expect("compiles")
    }

    #[test]
    fn valid_configurations_pass() {
        let s = schema();
        s.validate(&json!({})).expect("empty");
        s.validate(&json!({"combine": "min", "gap": 2, "share": 0.5, "bands": [{"label": "A"}]}))
            .expect("full");
        s.validate(&json!({"gap": 2.0})).expect("2.0 is an integer");
    }

    #[test]
    fn problems_name_the_setting_and_the_rule() {
        let s = schema();
        let e = s.validate(&json!({"gap": 11})).expect_err("max");
        assert_eq!(e, "gap: 11 is greater than the maximum of 10");
        let e = s.validate(&json!({"combine": "median"})).expect_err("enum");
        assert!(
            e.contains("\"median\" is not one of \"mean\", \"min\", \"max\""),
            "{e}"
        );
        let e = s.validate(&json!({"gap": "two"})).expect_err("type");
        assert_eq!(e, "gap: expected an integer, got a string");
        let e = s.validate(&json!({"colour": 1})).expect_err("unknown");
        assert!(e.contains("unknown setting \"colour\""), "{e}");
        let e = s.validate(&json!({"bands": [{}]})).expect_err("required");
        assert_eq!(e, "bands[0]: \"label\" is required");
        let e = s.validate(&json!({"share": 0})).expect_err("exclusive");
        assert_eq!(e, "share: 0 must be greater than 0");
    }

    #[test]
    fn unsupported_keywords_and_non_object_roots_are_refused() {
        let e = Schema::compile(&json!({"type": "object", "properties": {"a": {"oneOf": []}}}))
            .expect_err("oneOf");
        assert!(e.contains("\"oneOf\" is not supported"), "{e}");
        assert!(e.contains("#/properties/a"), "{e}");
        assert!(Schema::compile(&json!({"type": "array"})).is_err());
        assert!(Schema::compile(&json!({"type": "wat"})).is_err());
        assert!(Schema::compile(&json!({"minimum": "1"})).is_err());
    }
}
