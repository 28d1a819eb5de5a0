//! A `smoe serve` child process on a loopback port, and a small HTTP/1.1
//! client over a plain TcpStream: the tests need to send broken bytes and
//! to hang up mid-stream, which a polished client would not let them do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fixture;

/// The model every server test runs. Changing this line moves them all
/// to another checkpoint.
pub const SERVE_MODEL: &str = "qwen3-moe-a";

pub struct Server {
    child: Child,
    pub addr: String,
    model: PathBuf,
    extra: Vec<String>,
}

impl Server {
    /// Starts `smoe serve` on a free port with `extra` arguments and waits
    /// until `/health` says the model is loaded.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_with(&fixture(SERVE_MODEL), extra)
    }

    /// [`Server::start`] on another model directory (a vault, say).
    pub fn start_with(model: &Path, extra: &[&str]) -> Server {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn(model, "0", &extra);
        let server = Server {
            child,
            addr,
            model: model.to_path_buf(),
            extra,
        };
        server.wait_ready();
        server
    }

    /// Ends the process at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as `docker stop` and Kubernetes do, and waits for
    /// the process to end.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        self.child.wait().unwrap()
    }

    /// Starts the server again, as before and on the same port, and waits
    /// until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.addr.rsplit(':').next().unwrap().to_string();
        let (child, addr) = spawn(&self.model, &port, &self.extra);
        assert_eq!(addr, self.addr);
        self.child = child;
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.get("/health").status != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process id, for reading its memory use.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn get(&self, path: &str) -> Reply {
        request(&self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        request(
            &self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn health(&self) -> Value {
        let r = self.get("/health");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Waits until no request waits or runs, and returns `/health` then.
    pub fn idle_health(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = self.health();
            if h["queue"]["waiting"] == 0 && h["queue"]["in_flight"] == 0 {
                return h;
            }
            assert!(Instant::now() < deadline, "generations still running: {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `smoe serve` on `port` and returns it with the address it
/// says it listens on.
fn spawn(model: &Path, port: &str, extra: &[String]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smoe"))
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--port", port, "--threads", "1"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start smoe serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("smoe serve exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // The rest of stderr goes to the test's output, for failures.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("[smoe serve] {line}");
        }
    });
    (child, addr)
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .flat_map(|event| event.lines())
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    // A hung server fails the test instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s
}

fn send_head(
    s: &mut TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    // A server that refuses a large body may close before reading it all.
    let _ = s.write_all(body);
}

/// One request on its own connection; the whole response.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = connect(addr);
    send_head(&mut s, addr, method, path, headers, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body).expect("a chunked body cut off");
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// A chunked body's payload; None when it was cut off before its last
/// (empty) chunk.
pub fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..eol]).ok()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(eol + 2..eol + 2 + size)?);
        raw = raw.get(eol + 4 + size..)?;
    }
}

/// Sends a JSON POST and returns the connection without reading from it.
pub fn post_open(addr: &str, path: &str, body: &Value) -> TcpStream {
    let mut s = connect(addr);
    send_head(
        &mut s,
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    s
}

/// Posts a streaming request, reads until one of `markers` has arrived,
/// and hangs up without reading the rest. Returns whether one came.
pub fn post_and_hang_up(addr: &str, path: &str, body: &Value, markers: &[&str]) -> bool {
    let mut s = post_open(addr, path, body);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&seen);
        if markers.iter().any(|m| text.contains(m)) {
            // Dropping the socket with unread data resets the connection.
            return true;
        }
    }
}
