//! The console's session: a signed cookie, so that any replica of the fleet accepts what
//! another one issued without shared state. Its key is derived from the API token the user
//! logged in with (every replica has the same tokens); removing a token from `api.tokens`
//! ends its sessions. Pure: the clock is passed in.
//!
//! A cookie is `<scope>.<expires>.<mac>` with `mac = HMAC-SHA256(key(token), scope.expires)`.
//! A form's CSRF token is `HMAC-SHA256(key(token), "csrf." + mac)`: only a page of this
//! session can know it.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiToken, Scope};

type HmacSha256 = Hmac<Sha256>;

/// The cookie's name.
pub const COOKIE: &str = "harness_session";
/// How long a session lasts.
pub const LIFETIME_S: i64 = 12 * 3600;

/// A checked session: what it may do, and the token for its forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub scope: Scope,
    pub csrf: String,
}

fn key(token: &ApiToken) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"harness console session\0");
    h.update(token.token.expose().as_bytes());
    h.finalize().into()
}

fn mac(key: &[u8], message: &str) -> String {
    let mut m = HmacSha256::new_from_slice(key).expect("any key length");
    m.update(message.as_bytes());
    hex(&m.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Admin => "admin",
    }
}

/// The token `presented` names, if it is one of `tokens` (compared in constant time).
pub fn token_of<'a>(tokens: &'a [ApiToken], presented: &str) -> Option<&'a ApiToken> {
    let mut found = None;
    for t in tokens {
        if bool::from(
            t.token
                .expose()
                .as_bytes()
                .ct_eq(presented.trim().as_bytes()),
        ) {
            found = Some(t);
        }
    }
    found
}

/// A new session's cookie value for `token`, issued at `now` (Unix seconds).
pub fn issue(token: &ApiToken, now: i64) -> String {
    let body = format!("{}.{}", scope_name(token.scope), now + LIFETIME_S);
    let m = mac(&key(token), &body);
    format!("{body}.{m}")
}

/// The session a cookie value stands for, if one of `tokens` signed it and it has not
/// expired at `now`.
pub fn check(tokens: &[ApiToken], cookie: &str, now: i64) -> Option<Session> {
    let (body, presented) = cookie.rsplit_once('.')?;
    let (scope, expires) = body.split_once('.')?;
    let expires: i64 = expires.parse().ok()?;
    if expires <= now {
        return None;
    }
    let mut found = None;
    for t in tokens {
        let k = key(t);
        let expected = mac(&k, body);
        if bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
            && scope == scope_name(t.scope)
        {
            found = Some(Session {
                scope: t.scope,
                csrf: mac(&k, &format!("csrf.{presented}")),
            });
        }
    }
    found
}

/// Whether `presented` is the CSRF token of `session`.
pub fn csrf_ok(session: &Session, presented: &str) -> bool {
    bool::from(session.csrf.as_bytes().ct_eq(presented.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str, scope: Scope) -> ApiToken {
        ApiToken {
            token: crate::config::Secret::new(t.to_string()),
            scope,
        }
    }

    #[test]
    fn a_session_holds_for_its_lifetime_only_and_only_with_its_token() {
        let admin = token("admin-token-0123456789", Scope::Admin);
        let read = token("read-token-0123456789", Scope::Read);
        let tokens = [admin.clone(), read.clone()];
        let c = issue(&read, 1000);
        let s = check(&tokens, &c, 1001).expect("valid");
        assert_eq!(s.scope, Scope::Read);
        assert!(check(&tokens, &c, 1000 + LIFETIME_S).is_none(), "expired");
        // Another scope written into the cookie breaks the signature.
        let forged = c.replacen("read.", "admin.", 1);
        assert!(check(&tokens, &forged, 1001).is_none());
        // A token removed from the configuration ends its sessions.
        assert!(check(std::slice::from_ref(&admin), &c, 1001).is_none());
        assert!(check(&tokens, "garbage", 1001).is_none());
        // The CSRF token is this session's.
        assert!(csrf_ok(&s, &s.csrf));
        let other = check(&tokens, &issue(&admin, 1000), 1001).unwrap();
        assert!(!csrf_ok(&s, &other.csrf));
        assert_eq!(
            token_of(&tokens, " admin-token-0123456789 ").map(|t| t.scope),
            Some(Scope::Admin)
        );
        assert!(token_of(&tokens, "nope").is_none());
    }
}
