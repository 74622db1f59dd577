//! Delivering an escalation to a person: a JSON POST to `escalation.webhook_url` and an
//! e-mail to `escalation.email_to` through `escalation.smtp_url`.
//!
//! The webhook only goes to `https` URLs or hosts listed in `escalation.allow_hosts`; an
//! address that is not public unicast (loopback, private, link-local, and every other
//! special-purpose range, in any IPv4 or IPv6 spelling) is refused unless its host is listed
//! (no replica can be made to call into its own network). The resolved address is pinned for
//! the request, so DNS cannot change it after the check, and no proxy is used. 5 s timeout,
//! 3 retries with backoff, no redirects. A failed delivery is reported, never raised: it must
//! not stop the replica. The URL is a secret: no message quotes it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;

use crate::config::EscalationConfig;

const TIMEOUT: Duration = Duration::from_secs(5);
const RETRIES: u32 = 3;

/// Where an escalation went, or why it did not.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub channel: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Whether `ip` is anything but a public unicast address: loopback, private, link-local,
/// shared (CGNAT), "this network", documentation, benchmarking, multicast, reserved and the
/// IETF special-purpose blocks, and IPv6 forms that embed or translate to IPv4 (mapped,
/// compatible, NAT64, 6to4, Teredo), so no spelling of an internal address gets through.
fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0 // 0.0.0.0/8, "this network"
                || (a == 100 && (b & 0xc0) == 64) // 100.64.0.0/10, shared (CGNAT)
                || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24, IETF protocol assignments
                || (a == 192 && b == 88 && c == 99) // 192.88.99.0/24, 6to4 relay anycast
                || (a == 198 && (b & 0xfe) == 18) // 198.18.0.0/15, benchmarking
                || a >= 240 // 240.0.0.0/4, reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0..6] == [0, 0, 0, 0, 0, 0]) // ::/96, IPv4-compatible (::7f00:1)
                || (s[0] == 0x64 && s[1] == 0xff9b) // 64:ff9b::/96 and 64:ff9b:1::/48, NAT64
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // 100::/64, discard-only
                || (s[0] == 0x2001 && s[1] < 0x200) // 2001::/23, IETF (Teredo 2001::/32, ...)
                || (s[0] == 0x2001 && s[1] == 0xdb8) // 2001:db8::/32, documentation
                || s[0] == 0x2002 // 2002::/16, 6to4
                || (s[0] & 0xfe00) == 0xfc00 // fc00::/7, unique local
                || (s[0] & 0xffc0) == 0xfe80 // fe80::/10, link local
                || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, site local (deprecated)
        }
    }
}

/// `message` with every appearance of the secret `url` (whole, or its path and query, or its
/// password) replaced by `[redacted]`: error texts of HTTP and SMTP libraries quote URLs.
pub fn redact_url_in(message: &str, url: &str) -> String {
    let mut out = message.replace(url, "[redacted]");
    if let Ok(u) = url::Url::parse(url) {
        let tail = &u[url::Position::BeforePath..];
        if tail.len() > 1 {
            out = out.replace(tail, "/[redacted]");
        }
        if let Some(p) = u.password().filter(|p| !p.is_empty()) {
            out = out.replace(p, "[redacted]");
        }
        out = out.replace(u.as_str(), "[redacted]");
    }
    out
}

/// An error and its causes, one sentence, without the URL reqwest quotes in its own text.
fn describe(e: reqwest::Error) -> String {
    use std::error::Error as _;
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Checks the webhook URL and resolves the address to call. Pure policy plus DNS.
pub async fn check_webhook(
    url: &str,
    allow_hosts: &[String],
) -> Result<(url::Url, SocketAddr), String> {
    let u = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let host = u.host_str().ok_or("the URL has no host")?.to_string();
    let listed = allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host));
    if u.scheme() != "https" && !listed {
        return Err(format!(
            "{} URLs are refused; use https, or list the host {host:?} in escalation.allow_hosts",
            u.scheme()
        ));
    }
    let port = u.port_or_known_default().ok_or("the URL has no port")?;
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let addr = addrs
        .first()
        .copied()
        .ok_or_else(|| format!("{host} has no address"))?;
    if !listed && let Some(bad) = addrs.iter().find(|a| forbidden(a.ip())) {
        return Err(format!(
            "{host} resolves to {}, which is not a public address (loopback, private, \
             link-local or another special-purpose range); list it in escalation.allow_hosts \
             to allow it",
            bad.ip()
        ));
    }
    Ok((u, addr))
}

async fn post_webhook(url: &str, allow_hosts: &[String], payload: &Value) -> Delivery {
    let fail = |detail: String| Delivery {
        channel: "webhook",
        ok: false,
        detail,
    };
    let (u, addr) = match check_webhook(url, allow_hosts).await {
        Ok(v) => v,
        Err(e) => return fail(format!("refused: {e}")),
    };
    let host = u.host_str().unwrap_or_default().to_string();
    let client = match reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, addr)
        // A proxy (HTTP(S)_PROXY) would connect wherever it likes: the address checked and
        // pinned above is the only one this request may reach.
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(redact_url_in(&describe(e), url)),
    };
    let mut last = String::new();
    for attempt in 0..=RETRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << (attempt - 1))).await;
        }
        match client.post(u.clone()).json(payload).send().await {
            Ok(r) if r.status().is_success() => {
                return Delivery {
                    channel: "webhook",
                    ok: true,
                    detail: format!("{} after {} attempt(s)", r.status(), attempt + 1),
                };
            }
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = redact_url_in(&describe(e), url),
        }
    }
    // The URL may carry a token: name the host only.
    fail(format!("{host}: {last} after {} attempts", RETRIES + 1))
}

async fn send_email(smtp_url: &str, from: &str, to: &str, payload: &Value) -> Delivery {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let fail = |detail: String| Delivery {
        channel: "email",
        ok: false,
        detail,
    };
    let replica = payload["replica"].as_str().unwrap_or("?");
    let message = Message::builder()
        .from(match from.parse() {
            Ok(f) => f,
            Err(e) => return fail(format!("escalation.email_from: {e}")),
        })
        .to(match to.parse() {
            Ok(t) => t,
            Err(e) => return fail(format!("escalation.email_to: {e}")),
        })
        .subject(format!("Agent Harness: replica {replica} needs review"))
        .body(format!(
            "{}\n\nResume it with: harness fleet resume {replica}\n\n{}",
            payload["reason"].as_str().unwrap_or(""),
            serde_json::to_string_pretty(payload).unwrap_or_default()
        ));
    let message = match message {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    let transport = match AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url) {
        Ok(b) => b.timeout(Some(TIMEOUT)).build(),
        Err(e) => {
            return fail(format!(
                "escalation.smtp_url: {}",
                redact_url_in(&e.to_string(), smtp_url)
            ));
        }
    };
    match transport.send(message).await {
        Ok(r) => Delivery {
            channel: "email",
            ok: true,
            detail: format!("accepted ({})", r.code()),
        },
        Err(e) => fail(redact_url_in(&e.to_string(), smtp_url)),
    }
}

/// Sends `payload` everywhere escalations are configured to go.
pub async fn deliver(cfg: &EscalationConfig, payload: &Value) -> Vec<Delivery> {
    let mut out = Vec::new();
    if !cfg.enabled {
        return out;
    }
    if let Some(url) = &cfg.webhook_url {
        out.push(post_webhook(url.expose(), &cfg.allow_hosts, payload).await);
    }
    if let (Some(to), Some(smtp)) = (&cfg.email_to, &cfg.smtp_url) {
        out.push(send_email(smtp.expose(), &cfg.email_from, to, payload).await);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_http_and_internal_addresses_are_refused_unless_listed() {
        let err = check_webhook("http://example.com/hook", &[])
            .await
            .unwrap_err();
        assert!(err.contains("http URLs are refused"), "{err}");
        for url in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://169.254.169.254/latest",
            "https://[::1]/x",
            "https://192.168.0.1/x",
        ] {
            let err = check_webhook(url, &[]).await.unwrap_err();
            assert!(err.contains("not a public address"), "{url}: {err}");
        }
        // A listed host is allowed, plain http included, and resolved to where it points.
        let (url, addr) = check_webhook("http://127.0.0.1:9/hook", &["127.0.0.1".into()])
            .await
            .unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:9/hook");
        assert_eq!(addr, "127.0.0.1:9".parse::<SocketAddr>().unwrap());
    }

    #[tokio::test]
    async fn a_failed_delivery_never_shows_the_webhook_url() {
        // A listed host on a port where nothing listens: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/hooks/T0KEN-s3cret?sig=abc123");
        let cfg = EscalationConfig {
            enabled: true,
            webhook_url: Some(crate::config::Secret::new(url.clone())),
            allow_hosts: vec!["127.0.0.1".into()],
            ..EscalationConfig::default()
        };
        let d = deliver(&cfg, &serde_json::json!({"replica": "r"})).await;
        assert_eq!(d.len(), 1);
        assert!(!d[0].ok);
        for secret in ["T0KEN-s3cret", "abc123", "/hooks/"] {
            assert!(!d[0].detail.contains(secret), "{}", d[0].detail);
        }
        assert!(
            d[0].detail.contains("127.0.0.1"),
            "names the host: {}",
            d[0].detail
        );
    }

    #[test]
    fn urls_in_messages_are_redacted() {
        let url = "https://hooks.example.com/services/T0/B1/XyZ?token=abc";
        let msg = format!("error sending request for url ({url}): connection refused");
        let out = redact_url_in(&msg, url);
        assert!(!out.contains("XyZ") && !out.contains("abc"), "{out}");
        let smtp = "smtps://user:hunter2@mail.example.com:465";
        assert!(!redact_url_in("login failed for user:hunter2", smtp).contains("hunter2"));
    }

    #[test]
    fn special_purpose_addresses_are_refused() {
        for ip in [
            "0.0.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::7f00:1",
            "::a00:1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2001::1",
            "2001:db8::1",
            "100::1",
            "ff02::1",
            "fec0::1",
        ] {
            assert!(forbidden(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn the_webhook_client_ignores_proxy_settings() {
        // A proxy variable pointing at a listener of ours: the request must not go there.
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_port = target.local_addr().unwrap().port();
        // SAFETY: this test's process reads these variables only through reqwest, here.
        unsafe {
            std::env::set_var("HTTP_PROXY", format!("http://{proxy_addr}"));
            std::env::set_var("http_proxy", format!("http://{proxy_addr}"));
        }
        let served = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = target.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let d = post_webhook(
            &format!("http://127.0.0.1:{target_port}/hook"),
            &["127.0.0.1".into()],
            &serde_json::json!({}),
        )
        .await;
        unsafe {
            std::env::remove_var("HTTP_PROXY");
            std::env::remove_var("http_proxy");
        }
        assert!(d.ok, "{d:?}");
        served.await.unwrap();
        let proxied = tokio::time::timeout(Duration::from_millis(100), proxy.accept()).await;
        assert!(proxied.is_err(), "the proxy was contacted");
    }

    #[test]
    fn address_classes() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!forbidden(ip.parse().unwrap()), "{ip}");
        }
    }
}
