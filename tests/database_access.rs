//! No agent reaches the database: the private PostgreSQL listens on its Unix socket only, in a
//! directory agents cannot enter, and admits only the harness's own OS account (peer
//! authentication) even to a process that does reach the socket.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use harness::db::{self, PrivateServer, ServerOptions};
use harness::executor::{ExecStatus, Executor, RunSpec, Runtime};
use serde_json::{Value, json};

/// An agent that tries to open a PostgreSQL session everywhere it can: every TCP port
/// listening on loopback or on all addresses (from /proc/net/tcp and tcp6), the socket
/// directory it is told about, and every `.s.PGSQL.*` socket listed in /proc/net/unix.
/// For each target it sends a StartupMessage as `postgres` and reads the first answer.
const PROBE: &str = r#"
import os, socket, struct

def startup(sock):
    body = struct.pack("!I", 196608)
    for k, v in (("user", "postgres"), ("database", "postgres")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    head = b""
    while len(head) < 9:
        chunk = sock.recv(9 - len(head))
        if not chunk:
            break
        head += chunk
    if len(head) >= 9 and head[0:1] == b"R":
        code = struct.unpack("!I", head[5:9])[0]
        return "SESSION" if code == 0 else "auth-requested-%d" % code
    if head[0:1] == b"E":
        rest = sock.recv(4096)
        return "refused: " + (head[5:] + rest).decode("utf-8", "replace").replace("\0", " ")[:200]
    return "no-postgres-answer %r" % head[:16]

def listening_tcp():
    ports = set()
    for name, fam in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            local, state = f[1], f[3]
            if state != "0A":
                continue
            addr, port = local.split(":")
            port = int(port, 16)
            if fam == socket.AF_INET:
                ip = socket.inet_ntop(fam, bytes.fromhex(addr)[::-1])
                if ip.startswith("127.") or ip == "0.0.0.0":
                    ports.add(("127.0.0.1", port, fam))
            else:
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                ip = socket.inet_ntop(fam, raw)
                if ip in ("::1", "::"):
                    ports.add(("::1", port, fam))
    return sorted(ports)

def unix_sockets(socket_dir):
    paths = set()
    try:
        for line in open("/proc/net/unix").read().splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and ".s.PGSQL." in f[7]:
                paths.add(f[7])
    except OSError:
        pass
    try:
        for n in os.listdir(socket_dir):
            if n.startswith(".s.PGSQL."):
                paths.add(os.path.join(socket_dir, n))
    except OSError:
        pass
    return sorted(paths)

class Agent:
    def __init__(self, config):
        self.config = config

    def execute(self):
        cfg = self.config
        out = {"tcp": {}, "unix": {}}
        for ip, port, fam in listening_tcp():
            try:
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.settimeout(1.0)
                s.connect((ip, port))
                out["tcp"]["%s:%d" % (ip, port)] = startup(s)
                s.close()
            except Exception as e:
                out["tcp"]["%s:%d" % (ip, port)] = "error: %s" % e
        for path in unix_sockets(cfg["socket_dir"]) + [os.path.join(cfg["socket_dir"], ".s.PGSQL.%d" % cfg["port"])]:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(1.0)
                s.connect(path)
                out["unix"][path] = startup(s)
                s.close()
            except Exception as e:
                out["unix"][path] = "error: %s" % e
        return out
"#;

/// A home the unprivileged server account can reach.
fn reachable_home() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("harness-access-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

async fn start(home: &Path) -> PrivateServer {
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || PrivateServer::start(&home, &ServerOptions::default()))
        .await
        .unwrap()
        .unwrap()
}

async fn stop(server: PrivateServer) {
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

fn sessions(found: &Value) -> Vec<String> {
    let mut hits = Vec::new();
    for kind in ["tcp", "unix"] {
        for (target, answer) in found[kind].as_object().unwrap() {
            if answer.as_str() == Some("SESSION") {
                hits.push(format!("{kind} {target}"));
            }
        }
    }
    hits
}

#[tokio::test]
async fn an_agent_in_the_sandbox_gets_no_database_session() {
    let home = reachable_home();
    let server = start(home.path()).await;
    db::create_database(&server, db::PRIVATE_DATABASE)
        .await
        .unwrap();
    // The test suite's own server is running too (unless DATABASE_URL points elsewhere):
    // the probe attacks every PostgreSQL it can find on this host.
    let _ = tokio::task::spawn_blocking(common::admin_url).await;

    let cfg = harness::Config::load_from(None, Vec::<(String, String)>::new()).unwrap();
    let executor = Executor::new(&cfg.executor).unwrap();
    let mut spec = RunSpec::new(
        Runtime::Python {
            code: PROBE.to_string(),
        },
        &executor,
    );
    spec.config = json!({
        "socket_dir": home.path().join("pg"),
        "port": server.port(),
    });
    spec.timeout = Duration::from_secs(60);
    let r = executor.run(&spec).await.unwrap();
    assert_eq!(r.status, ExecStatus::Success, "{r:?}");
    let found = r.result.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&found).unwrap());
    assert!(
        found["unix"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with(home.path().to_str().unwrap())),
        "the probe tried the private server's socket: {found}"
    );
    let hits = sessions(&found);
    assert!(
        hits.is_empty(),
        "an agent opened a PostgreSQL session: {hits:?}"
    );
    stop(server).await;
}

#[tokio::test]
async fn the_private_server_listens_on_a_private_socket_only_and_trusts_no_one() {
    let home = reachable_home();
    let server = start(home.path()).await;
    let pool = db::connect(&server.url("postgres"), 1).await.unwrap();

    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(listen, "", "no TCP listener");
    let rules: Vec<(String, Option<String>, Option<Vec<String>>)> =
        sqlx::query_as("SELECT type, auth_method, options FROM pg_hba_file_rules")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!rules.is_empty());
    for (kind, method, _) in &rules {
        assert_eq!(kind, "local", "only Unix-socket rules: {rules:?}");
        assert_eq!(method.as_deref(), Some("peer"), "{rules:?}");
    }
    let idents: Vec<(String, String)> =
        sqlx::query_as("SELECT sys_name, pg_username FROM pg_ident_file_mappings")
            .fetch_all(&pool)
            .await
            .unwrap();
    let me = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .unwrap()
        .unwrap()
        .name;
    assert_eq!(
        idents,
        vec![(me, "postgres".to_string())],
        "only the harness's own account maps to the superuser"
    );
    pool.close().await;

    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&home.path().join("pg")), 0o700, "socket directory");
    assert_eq!(mode(&home.path().join("pg.port")) & 0o077, 0, "pg.port");
    assert_eq!(mode(&home.path().join("pg.log")) & 0o077, 0, "pg.log");

    if nix::unistd::Uid::effective().is_root() {
        // Open the directory for a moment: an account that reaches the socket anyway is still
        // refused by peer authentication.
        let data = home.path().join("pg");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
        let socket = data.join(format!(".s.PGSQL.{}", server.port()));
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let script = format!(
            "import socket, struct\n\
             s = socket.socket(socket.AF_UNIX); s.connect({socket:?})\n\
             b = struct.pack('!I', 196608) + b'user\\0postgres\\0database\\0postgres\\0\\0'\n\
             s.sendall(struct.pack('!I', len(b) + 4) + b)\n\
             print(s.recv(4096))\n",
            socket = socket.to_str().unwrap()
        );
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            answer.starts_with("b'E") && answer.contains("authentication failed"),
            "nobody at the socket must be refused: {answer}"
        );
    }
    stop(server).await;
}
