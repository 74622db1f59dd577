//! Extractors whose rejections are API errors: JSON bodies, path parameters and query strings
//! that do not fit answer in the documented `{"error", "detail"}` shape, and a 422 names the
//! field in words (`"invalid limit: must be a whole number"`), never in serde's internals.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::ApiError;

/// Integers written as JSON numbers with a zero fraction (`5.0`), which JSON Schema counts as
/// integers: accepted as the integer they are. A real fraction is still refused.
pub mod whole {
    use serde::{Deserialize, Deserializer, de::Error};
    use serde_json::Value;

    fn int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i128>, D::Error> {
        match Option::<serde_json::Number>::deserialize(d)? {
            None => Ok(None),
            Some(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i as i128))
                } else if let Some(u) = n.as_u64() {
                    Ok(Some(u as i128))
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if f.fract() == 0.0 && f.abs() < 9.0e15 {
                        Ok(Some(f as i128))
                    } else {
                        Err(D::Error::custom(
                            "invalid type: floating point, expected a whole number",
                        ))
                    }
                }
            }
        }
    }

    pub fn i32<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        let v = int(d)?.ok_or_else(|| D::Error::custom("invalid type: null, expected i32"))?;
        i32::try_from(v).map_err(|_| D::Error::custom("number too large to fit in target type"))
    }

    pub fn option_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        int(d)?
            .map(|v| {
                u32::try_from(v).map_err(|_| {
                    D::Error::custom("invalid value: a negative or too large number, expected u32")
                })
            })
            .transpose()
    }

    /// `v` with a whole-valued float made an integer (only at the top: payloads stay as sent).
    pub fn normalize(v: Value) -> Value {
        match &v {
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Value::from(f as i64)
                } else {
                    v
                }
            }
            _ => v,
        }
    }
}

/// `field` and a reason a person understands, from a serde path (`.`, `priority`, `config.env`)
/// and serde's message.
pub fn field_error(path: &str, message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("missing field ") {
        let field = first_quoted(rest).unwrap_or_else(|| rest.to_string());
        return (join_path(path, field), "is required".into());
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return unknown_field(path, rest);
    }
    let field = match path {
        "" | "." => "body".to_string(),
        p => p.to_string(),
    };
    (field, value_reason(message))
}

/// The first `backquoted` part of a serde message.
fn first_quoted(m: &str) -> Option<String> {
    let start = m.find('`')? + 1;
    let len = m[start..].find('`')?;
    Some(m[start..start + len].to_string())
}

/// The backquoted names after "expected" in a serde message (the allowed fields or values).
fn expected_names(m: &str) -> Vec<String> {
    m.split_once("expected")
        .map(|(_, e)| {
            e.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn join_path(path: &str, field: String) -> String {
    match path {
        "" | "." => field,
        p => format!("{p}.{field}"),
    }
}

/// "unknown field `x`, expected one of `a`, `b`": where it is and what is allowed there.
fn unknown_field(path: &str, rest: &str) -> (String, String) {
    let field = first_quoted(rest).unwrap_or_default();
    let allowed = expected_names(rest);
    let reason = if allowed.is_empty() {
        "is not accepted here".to_string()
    } else {
        format!("is not accepted here; allowed: {}", allowed.join(", "))
    };
    // serde_path_to_error's path already ends at the unknown field.
    let at = if path == field || path.ends_with(&format!(".{field}")) {
        path.to_string()
    } else {
        join_path(path, field)
    };
    (at, reason)
}

/// What is wrong with a value, from serde's message about it.
fn value_reason(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((got, expected)) = rest.split_once(", expected ")
    {
        return format!("must be {}, not {}", friendly_type(expected), got_kind(got));
    }
    if let Some(rest) = message.strip_prefix("invalid value: ")
        && let Some((got, expected)) = rest.split_once(", expected ")
    {
        return format!("must be {}, not {got}", friendly_type(expected));
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return format!(
            "{} is not one of the allowed values: {}",
            first_quoted(rest).unwrap_or_default(),
            expected_names(rest).join(", ")
        );
    }
    if message.contains("invalid digit") || message.contains("cannot parse integer") {
        return "must be a whole number".into();
    }
    if message.contains("number too large") || message.contains("number too small") {
        return "is out of range".into();
    }
    if message.contains("invalid float literal") {
        return "must be a number".into();
    }
    message.to_string()
}

/// Serde's names of types, as a person would say them.
fn friendly_type(expected: &str) -> String {
    let e = expected.trim();
    let words = match e {
        // (`whole` reads integer fields as JSON numbers first.)
        "i8" | "i16" | "i32" | "i64" | "isize" | "a JSON number" => "a whole number",
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number, 0 or more",
        "f32" | "f64" => "a number",
        "a string" | "String" => "a string",
        "a boolean" | "bool" => "true or false",
        "a sequence" => "a list",
        "a map" => "an object",
        _ => return e.trim_start_matches("struct ").to_string(),
    };
    words.to_string()
}

/// What was sent, as a kind of value (never the value: it may be long, or a secret).
fn got_kind(got: &str) -> &'static str {
    let g = got.trim();
    if g.starts_with("string") {
        "a string"
    } else if g.starts_with("integer") {
        "a whole number"
    } else if g.starts_with("floating point") {
        "a number with a fraction"
    } else if g.starts_with("boolean") {
        "true or false"
    } else if g.starts_with("sequence") {
        "a list"
    } else if g.starts_with("map") {
        "an object"
    } else if g.starts_with("null") || g.starts_with("unit") {
        "null"
    } else {
        "another kind of value"
    }
}

/// The error for a JSON body that does not parse or does not fit `T`.
pub fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed JSON",
            json!({ "line": inner.line(), "column": inner.column(), "reason": inner.to_string() }),
        );
    }
    let message = inner.to_string();
    // serde_json appends " at line L column C" to data errors.
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    let (field, reason) = field_error(&path, message);
    ApiError::invalid(&field, reason)
}

/// Parses `bytes` as JSON into `T`, with API errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed JSON",
            json!({ "line": e.line(), "column": e.column(), "reason": e.to_string() }),
        )
    })?;
    Ok(v)
}

/// A JSON body (`Content-Type: application/json`) of type `T`: 400 malformed, 415 not JSON,
/// 422 naming the field that does not fit.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|m| {
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send Content-Type: application/json",
                Value::Null,
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError::new(r.status(), "the body could not be read", Value::Null))?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Path parameters of type `T`: a value that does not parse is a 422 naming the parameter.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(match e.kind() {
                ErrorKind::ParseErrorAtKey {
                    key,
                    value,
                    expected_type,
                } => ApiError::invalid(
                    key.as_str(),
                    format!("{value:?} is not {}", friendly_type(expected_type)),
                ),
                ErrorKind::ParseErrorAtIndex {
                    value,
                    expected_type,
                    ..
                }
                | ErrorKind::ParseError {
                    value,
                    expected_type,
                } => {
                    // A lone parameter is parsed without its name: find it among the raw ones.
                    let raw = axum::extract::RawPathParams::from_request_parts(parts, state).await;
                    let name = raw
                        .ok()
                        .and_then(|r| {
                            let mut it = r.iter();
                            match (it.next(), it.next()) {
                                (Some((k, _)), None) => Some(k.to_string()),
                                _ => None,
                            }
                        })
                        .unwrap_or_else(|| "path".to_string());
                    ApiError::invalid(
                        &name,
                        format!("{value:?} is not {}", friendly_type(expected_type)),
                    )
                }
                _ => ApiError::invalid("path", e.body_text()),
            }),
            Err(other) => Err(ApiError::new(
                other.status(),
                "the path could not be read",
                Value::Null,
            )),
        }
    }
}

/// A query string of type `T`: a parameter that does not parse is a 422 naming it.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let (field, reason) = field_error(&path, &e.into_inner().to_string());
                ApiError::invalid(&field, reason)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_become_sentences_naming_the_field() {
        assert_eq!(
            field_error(".", "missing field `kind`"),
            ("kind".into(), "is required".into())
        );
        assert_eq!(
            field_error(
                ".",
                "unknown field `knd`, expected one of `kind`, `payload`"
            ),
            (
                "knd".into(),
                "is not accepted here; allowed: kind, payload".into()
            )
        );
        assert_eq!(
            field_error("priority", "invalid type: string \"high\", expected i32"),
            (
                "priority".into(),
                "must be a whole number, not a string".into()
            )
        );
        assert_eq!(
            field_error("limit", "invalid digit found in string"),
            ("limit".into(), "must be a whole number".into())
        );
        assert_eq!(
            field_error("config", "missing field `timeout`"),
            ("config.timeout".into(), "is required".into())
        );
        let (f, r) = field_error(
            "overlap",
            "unknown variant `never`, expected one of `skip`, `queue`, `allow`",
        );
        assert_eq!(f, "overlap");
        assert!(
            r.contains("never") && r.contains("skip, queue, allow"),
            "{r}"
        );
    }
}
