//! A real Chromium, driven over WebDriver (the W3C protocol, spoken with reqwest) by a
//! `chromedriver` this module starts: what the console's tests click through.

use serde_json::{Value, json};
use std::time::Duration;

/// The element key of the W3C WebDriver protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromedriver` on PATH, or why the browser tests cannot run. `CONSOLE_BROWSER_REQUIRED=1`
/// (set by `.ci/run`) turns its absence into a failure instead of a skip.
pub fn driver_or_skip() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("chromedriver"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CONSOLE_BROWSER_REQUIRED").is_some() => {
            panic!("chromedriver is not installed: apt-get install chromium chromium-driver")
        }
        None => {
            eprintln!(
                "skipping the browser test: chromedriver is not installed \
                 (apt-get install chromium chromium-driver)"
            );
            None
        }
    }
}

/// A browser session, and the chromedriver behind it (both gone when dropped).
pub struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: super::Proc,
}

/// A WebDriver call that failed, with what the driver said.
fn answer(v: Value, what: &str) -> Value {
    if let Some(e) = v["value"].get("error") {
        panic!("webdriver {what}: {e} {}", v["value"]["message"]);
    }
    v["value"].clone()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with the browser log kept.
    pub async fn start(driver: &std::path::Path) -> Browser {
        let port = super::free_port();
        let proc = super::Proc::spawn(
            std::process::Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        super::eventually(
            "chromedriver to answer",
            Duration::from_secs(20),
            async || {
                http.get(format!("{base}/status"))
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            },
        )
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
            ]},
        }}});
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = answer(v, "new session")["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        Browser {
            http,
            base: format!("{base}/session/{session}"),
            _driver: proc,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        answer(v, path)
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The elements matching a CSS selector, as WebDriver ids.
    pub async fn all(&self, css: &str) -> Vec<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e[ELEMENT].as_str().unwrap().to_string())
            .collect()
    }

    /// The one element matching `css` (waiting for it up to 10 s).
    pub async fn find(&self, css: &str) -> String {
        let what = format!("an element {css}");
        super::eventually(&what, Duration::from_secs(10), async || {
            self.all(css).await.into_iter().next()
        })
        .await
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Runs `script` in the page and returns its value.
    pub async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// The text of the first element matching `css` ("" when there is none).
    pub async fn text(&self, css: &str) -> String {
        let css = serde_json::to_string(css).unwrap();
        self.run(&format!(
            "const e = document.querySelector({css}); return e ? e.textContent : '';"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The browser's console messages at level SEVERE (errors), since the last call.
    pub async fn errors(&self) -> Vec<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Resizes the window (a phone: 390 × 844).
    pub async fn set_window(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Accepts the page's `confirm()` (waiting for it up to 10 s).
    pub async fn accept_alert(&self) {
        super::eventually("a confirm dialog", Duration::from_secs(10), async || {
            let r = self
                .http
                .post(format!("{}/alert/accept", self.base))
                .json(&json!({}))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }

    /// Presses and releases one key on whatever has the focus (WebDriver key codes:
    /// `\u{E004}` Tab, `\u{E007}` Enter).
    pub async fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key},
        ]}]});
        self.call(reqwest::Method::POST, "/actions", Some(actions))
            .await;
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}
