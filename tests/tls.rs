//! TLS to PostgreSQL: a server of the test's own with SSL on (certificates from a CA made
//! here), reached over TCP with every `sslmode` a managed database asks for.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A PostgreSQL with SSL on, listening on 127.0.0.1, accepting `postgres` without a password.
struct TlsServer {
    port: u16,
    ca: PathBuf,
    other_ca: PathBuf,
    _server: common::Proc,
    _dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    common::free_port()
}

impl TlsServer {
    async fn start() -> TlsServer {
        let dir = tempfile::Builder::new()
            .prefix("harness-tls-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A CA, a server certificate it signs for localhost and 127.0.0.1, and another CA.
        let subj = |cn: &str| format!("/CN={cn}");
        for (name, cn) in [("ca", "harness test CA"), ("other", "another CA")] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                    "-subj",
                    &subj(cn),
                ],
            );
        }
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        // PostgreSQL refuses to run as root: as `postgres` (else `nobody`) then.
        let account = if nix::unistd::Uid::effective().is_root() {
            let u = nix::unistd::User::from_name("postgres")
                .unwrap()
                .or_else(|| nix::unistd::User::from_name("nobody").unwrap())
                .unwrap();
            Some((u.uid.as_raw(), u.gid.as_raw()))
        } else {
            None
        };
        let data = d.join("data");
        let as_server = |cmd: &mut Command| {
            if let Some((uid, gid)) = account {
                cmd.uid(uid).gid(gid);
            }
        };
        for f in ["server.key", "server.pem", "ca.pem"] {
            if let Some((uid, gid)) = account {
                std::os::unix::fs::chown(d.join(f), Some(uid), Some(gid)).unwrap();
            }
        }
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::create_dir(&data).unwrap();
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        }
        let bin = harness::db::private::find_bindir(None).unwrap();
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
            ])
            .env("LC_ALL", "C");
        as_server(&mut initdb);
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // TLS or plain text from 127.0.0.1: the client's sslmode decides.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let port = free_port();
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .args(["-D", data.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={port}")])
            .args(["-c", &format!("unix_socket_directories={}", data.display())])
            .args(["-c", "ssl=on"])
            .args([
                "-c",
                &format!("ssl_cert_file={}", d.join("server.pem").display()),
            ])
            .args([
                "-c",
                &format!("ssl_key_file={}", d.join("server.key").display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        as_server(&mut postgres);
        let server = common::Proc::spawn(&mut postgres);
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
        common::eventually(
            "the TLS server to accept",
            Duration::from_secs(30),
            async || harness::db::connect(&url, 1).await.ok().map(|_| ()),
        )
        .await;
        TlsServer {
            port,
            ca: d.join("ca.pem"),
            other_ca: d.join("other.pem"),
            _server: server,
            _dir: dir,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }
}

/// Whether the session of a pool on `url` is encrypted, as the server sees it.
async fn encrypted(url: &str) -> Result<bool, String> {
    let pool = harness::db::connect(url, 1)
        .await
        .map_err(|e| format!("{e:#}: {:?}", std::error::Error::source(&e)))?;
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    Ok(ssl)
}

#[tokio::test]
async fn every_sslmode_a_managed_database_asks_for_works_and_a_wrong_ca_is_refused() {
    let s = TlsServer::start().await;
    // The control: plain text when asked for.
    assert_eq!(
        encrypted(&s.url("127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    // The default (prefer) encrypts when the server can.
    assert_eq!(encrypted(&s.url("127.0.0.1", "")).await, Ok(true));
    assert_eq!(
        encrypted(&s.url("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    let ca = s.ca.display().to_string();
    assert_eq!(
        encrypted(&s.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await,
        Ok(true)
    );
    assert_eq!(
        encrypted(&s.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    // A certificate no trusted CA signed is refused, and the error says so.
    let other = s.other_ca.display().to_string();
    let err = encrypted(&s.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // The binary, with the mode and CA from the libpq variables the chart sets.
    let home = tempfile::tempdir().unwrap();
    let out = common::harness_command()
        .arg("migrate")
        .env("HARNESS_HOME", home.path())
        .env("DATABASE_URL", s.url("localhost", ""))
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &s.ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = common::harness_command()
        .arg("migrate")
        .env("HARNESS_HOME", home.path())
        .env("DATABASE_URL", s.url("localhost", ""))
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &s.other_ca)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong CA was accepted");
}
