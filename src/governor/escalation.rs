//! Delivering an escalation to a person: a JSON POST to `escalation.webhook_url` and an
//! e-mail to `escalation.email_to` through `escalation.smtp_url`.
//!
//! The webhook only goes to `https` URLs or hosts listed in `escalation.allow_hosts`; an
//! address that is loopback, private or link-local is refused unless its host is listed (no
//! replica can be made to call into its own network). The resolved address is pinned for
//! the request, so DNS cannot change it after the check. 5 s timeout, 3 retries with backoff,
//! no redirects. A failed delivery is reported, never raised: it must not stop the replica.

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

fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // 100.64/10 CGNAT
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00 // unique local
                || (v6.segments()[0] & 0xffc0) == 0xfe80 // link local
                || v6.to_ipv4_mapped().is_some_and(|v4| forbidden(IpAddr::V4(v4)))
        }
    }
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
            "{host} resolves to {}, a loopback, private or link-local address; list it in \
             escalation.allow_hosts to allow it",
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
        .build()
    {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
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
            Err(e) => last = e.to_string(),
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
        Err(e) => return fail(format!("escalation.smtp_url: {e}")),
    };
    match transport.send(message).await {
        Ok(r) => Delivery {
            channel: "email",
            ok: true,
            detail: format!("accepted ({})", r.code()),
        },
        Err(e) => fail(e.to_string()),
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
            assert!(
                err.contains("loopback, private or link-local"),
                "{url}: {err}"
            );
        }
        assert!(
            check_webhook("http://127.0.0.1:9/hook", &["127.0.0.1".into()])
                .await
                .is_ok()
        );
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
