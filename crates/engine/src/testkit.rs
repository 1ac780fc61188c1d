//! Test helpers (feature `testkit`): throwaway `redis-server` processes on free loopback
//! ports, stopped (SIGKILL, by their process) when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts a server (keeping nothing on disk) with extra arguments, and waits until it answers.
    pub fn start(extra: &[String]) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let server = Self { child, port };
        server.wait_until(|info| !info.is_empty(), "the server answers");
        server
    }

    /// A replica of `primary`.
    pub fn replica_of(primary: &RedisServer) -> Self {
        Self::start(&[
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ])
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `INFO replication` of this server ("" if it does not answer).
    pub fn info(&self) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "INFO", "replication"])
            .output();
        output
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Polls `INFO replication` until `ready` holds (at most 20 s).
    pub fn wait_until(&self, ready: impl Fn(&str) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ready(&self.info()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
