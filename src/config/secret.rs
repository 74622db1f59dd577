//! Secrets in the configuration: a string type that never prints, the keys whose values are
//! secrets (no error quotes them), and URL redaction.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Keys whose values are secrets, or lists of them: no error message quotes their values.
const SECRET_KEYS: [&str; 4] = [
    "api.tokens",
    "database.url",
    "escalation.webhook_url",
    "escalation.smtp_url",
];

pub(super) fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| {
        key == *k || key.starts_with(&format!("{k}[")) || key.starts_with(&format!("{k}."))
    })
}

/// `message` with every double-quoted value (serde quotes the offending value that way)
/// replaced by `(value hidden)`.
pub(super) fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        let mut escaped = false;
        for q in chars.by_ref() {
            match (q, escaped) {
                ('\\', false) => escaped = true,
                ('"', false) => break,
                _ => escaped = false,
            }
        }
        out.push_str("(value hidden)");
    }
    // "invalid type: integer `123`, expected ...": the first backquoted part is the value
    // (elsewhere backquotes name fields and variants, which are not secret).
    if (out.starts_with("invalid type:") || out.starts_with("invalid value:"))
        && let Some(start) = out.find('`')
        && let Some(len) = out[start + 1..].find('`')
    {
        out.replace_range(start..start + len + 2, "(value hidden)");
    }
    out
}

/// A secret string: deserializes from a plain string, prints as `[redacted]` everywhere.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:[redacted]@host/db`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("[redacted]"));
            }
            // Query parameters may carry a password too (`?password=`).
            if u.query().is_some_and(|q| q.contains("password")) {
                u.set_query(Some("[redacted]"));
            }
            u.to_string()
        }
        Err(_) => "[redacted]".to_string(),
    }
}
