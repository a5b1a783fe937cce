//! Test support: checks that an HTTP response (method, path, status, body) is one the
//! OpenAPI 3.1 document of an API allows. Schemas are validated as JSON Schema 2020-12 (which
//! OpenAPI 3.1 uses), with `#/components/...` references resolved in the same document.
//!
//! Used by the tests of the VMM's and the daemon's APIs, so that the documents and the code
//! cannot drift apart.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

use serde_json::{Map, Value};

/// An OpenAPI document, loaded.
#[derive(Debug, Clone)]
pub struct OpenApi {
    doc: Value,
}

impl OpenApi {
    /// Parses the document's JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if !doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1"))
        {
            return Err("not an OpenAPI 3.1 document".into());
        }
        Ok(OpenApi { doc })
    }

    /// Checks one response. `path` is the request's path (templates such as `/vms/{name}`
    /// match any one segment).
    pub fn check(&self, method: &str, path: &str, status: u16, body: &[u8]) -> Result<(), String> {
        let operation = self.operation(method, path)?;
        let responses = &operation["responses"];
        let response = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .ok_or_else(|| format!("{method} {path}: status {status} is not documented"))?;
        let schema = &response["content"]["application/json"]["schema"];
        if schema.is_null() {
            if !body.is_empty() {
                return Err(format!(
                    "{method} {path} {status}: the document says no body, got {}",
                    String::from_utf8_lossy(body)
                ));
            }
            return Ok(());
        }
        let instance: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "{method} {path} {status}: body is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        })?;
        self.validate(schema, &instance)
            .map_err(|e| format!("{method} {path} {status}: {e}; body: {instance}"))
    }

    /// Validates `instance` against a named schema of `#/components/schemas`.
    pub fn check_schema(&self, name: &str, instance: &Value) -> Result<(), String> {
        let schema = serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
        self.validate(&schema, instance)
    }

    fn operation(&self, method: &str, path: &str) -> Result<&Value, String> {
        let paths = self.doc["paths"]
            .as_object()
            .ok_or("the document has no paths")?;
        let (_, item) = paths
            .iter()
            .find(|(template, _)| matches_template(template, path))
            .ok_or_else(|| format!("{path} is not in the document"))?;
        let operation = &item[method.to_ascii_lowercase()];
        if operation.is_null() {
            return Err(format!("{method} {path} is not in the document"));
        }
        Ok(operation)
    }

    fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        // The schema becomes the root of a document that also holds the components, so that
        // its `#/components/...` references resolve.
        let mut root = match schema {
            Value::Object(map) => map.clone(),
            other => {
                let mut map = Map::new();
                map.insert("allOf".into(), Value::Array(vec![other.clone()]));
                map
            }
        };
        root.insert("components".into(), self.doc["components"].clone());
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&Value::Object(root))
            .map_err(|e| format!("bad schema in the document: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Every (method, path template) the document describes.
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(paths) = self.doc["paths"].as_object() {
            for (path, item) in paths {
                if let Some(item) = item.as_object() {
                    for method in item.keys() {
                        out.push((method.to_ascii_uppercase(), path.clone()));
                    }
                }
            }
        }
        out
    }
}

fn matches_template(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r##"{
      "openapi": "3.1.0",
      "paths": {
        "/things/{name}": {
          "get": {"responses": {
            "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
            "204": {}
          }}
        }
      },
      "components": {"schemas": {"Thing": {"type": "object", "required": ["n"],
        "additionalProperties": false, "properties": {"n": {"type": "integer"}}}}}
    }"##;

    #[test]
    fn good_and_bad_responses() {
        let api = OpenApi::parse(DOC).unwrap();
        api.check("GET", "/things/a", 200, br#"{"n": 1}"#).unwrap();
        api.check("GET", "/things/a", 204, b"").unwrap();
        assert!(api
            .check("GET", "/things/a", 200, br#"{"n": "x"}"#)
            .is_err());
        assert!(api
            .check("GET", "/things/a", 200, br#"{"n": 1, "m": 2}"#)
            .is_err());
        assert!(api.check("GET", "/things/a", 204, b"{}").is_err());
        assert!(api.check("GET", "/things/a", 404, b"").is_err());
        assert!(api.check("PUT", "/things/a", 200, b"").is_err());
        assert!(api.check("GET", "/things", 200, b"").is_err());
        assert_eq!(
            api.operations(),
            vec![("GET".into(), "/things/{name}".into())]
        );
    }
}
