//! Test helpers (feature `testkit`): throwaway `redis-server` and PostgreSQL servers on free
//! loopback ports, stopped when dropped, so tests that kill or restart a server never touch
//! the machine's shared ones.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shared PostgreSQL the tests use: `AGENTSTORE_TEST_POSTGRES_URL`, else
/// `postgresql://postgres@127.0.0.1:5432/test` (what `.ci/run` makes sure is running).
pub fn postgres_url() -> String {
    std::env::var("AGENTSTORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into())
}

/// The shared Redis the tests use: `AGENTSTORE_TEST_REDIS_URL`, else `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("AGENTSTORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    extra: Vec<String>,
}

/// A port on 127.0.0.1 that was free a moment ago, and that no other test on this machine
/// was handed in the last ten minutes.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // Below Linux's ephemeral range (32768–60999): a port the kernel hands out for binds to
    // port 0 is also what it hands out as the source port of outgoing connections, so between
    // being picked here and bound by the process under test it could be taken by any
    // connection on the machine (the nodes of parallel tests make many). Ports below the range
    // are only ever taken by a bind, and a bind here checks the port is free now.
    const FIRST: u64 = 20_000;
    const COUNT: u64 = 12_000;
    loop {
        let mut random = std::collections::hash_map::RandomState::new().build_hasher();
        random.write_u32(std::process::id());
        let port = (FIRST + random.finish() % COUNT) as u16;
        if reserve(port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Claims `port` for this test: tests run in parallel processes, and two of them picking the
/// same free port before either binds it would collide (a cluster test picks nine). A claim
/// is a file created exclusively in a directory every test process shares; claims older than
/// ten minutes are stale (their test is over) and are taken over.
fn reserve(port: u16) -> bool {
    let dir = std::env::temp_dir().join("agentstore-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let claim = dir.join(port.to_string());
    let stale = std::fs::metadata(&claim)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|age| age > std::time::Duration::from_secs(600));
    if stale {
        let _ = std::fs::remove_file(&claim);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&claim)
        .is_ok()
}

impl RedisServer {
    /// Starts a server (keeping nothing on disk) with extra arguments, and waits until it answers.
    pub fn start(extra: &[String]) -> Self {
        Self::spawn(free_port(), extra.to_vec())
    }

    fn spawn(port: u16, extra: Vec<String>) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let server = Self { child, port, extra };
        server.wait_until(|info| !info.is_empty(), "the server answers");
        server
    }

    /// Starts the server again on the same port with the same arguments (after `stop`).
    pub fn restart(&mut self) {
        self.stop();
        let again = Self::spawn(self.port, self.extra.clone());
        *self = again;
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

    /// The server's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// Sends the server `signal` (`-STOP`, `-CONT`, ...).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
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

/// A private PostgreSQL cluster (initdb in a temporary directory, trust auth), run as the
/// `postgres` system user when the tests run as root, as PostgreSQL refuses to run as root.
#[derive(Debug)]
pub struct PostgresServer {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl PostgresServer {
    /// Creates and starts a cluster.
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|entry| entry.path().join("bin"))
            .find(|bin| bin.join("initdb").exists())
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!(
            "agentstore-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let server = Self {
            dir,
            bin,
            port: free_port(),
        };
        server.chown();
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.ctl("start");
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn chown(&self) {
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status();
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let status = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .stdout(Stdio::null())
                .status()
        } else {
            Command::new(&program)
                .args(args)
                .stdout(Stdio::null())
                .status()
        };
        assert!(status.is_ok_and(|s| s.success()), "{tool} {args:?} failed");
    }

    fn ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-m",
                "fast",
                action,
            ],
        );
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) {
        self.ctl("stop");
    }

    /// Starts it again on the same port after `stop`.
    pub fn start_again(&self) {
        self.ctl("start");
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let options = format!("-p {}", self.port);
        let program = self.bin.join("pg_ctl");
        let args = [
            "-D",
            &self.data(),
            "-o",
            &options,
            "-m",
            "immediate",
            "stop",
        ];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        } else {
            Command::new(&program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

/// A small tmpfs mounted at a directory (for full-disk tests), unmounted when dropped.
#[derive(Debug)]
pub struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB at `dir`. `None` where mounting is not allowed (not root),
    /// and the test should be skipped, unless `AGENTSTORE_REQUIRE_NETNS` is set (`.ci/run` sets
    /// it when it runs as root), where it panics instead: the test must run there.
    pub fn mount(dir: &std::path::Path, mib: u32) -> Option<Self> {
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var_os("AGENTSTORE_REQUIRE_NETNS").is_none(),
                "this test must run here: mounting a tmpfs failed"
            );
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        Some(Self {
            dir: dir.to_owned(),
        })
    }

    /// Fills what is left of the disk with one file (`filler`); returns its path. Removing it
    /// gives the space back.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler file");
        let chunk = vec![7u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        for _ in 0..64 {
            if file.write_all(&[7u8; 512]).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A disk held in memory that loses, when the machine crashes, everything written since the
/// last sync of each of its files, as a machine's page cache does when it loses power. It
/// crashes once a seeded number of writes (and syncs, to any of its files) has reached it:
/// from then on every call fails, as for a process that died, and each file holds what was
/// synced before.
#[derive(Debug, Clone)]
pub struct LossyDisk(std::sync::Arc<std::sync::Mutex<Machine>>);

#[derive(Debug)]
struct Machine {
    files: std::collections::BTreeMap<std::path::PathBuf, Image>,
    /// Writes and syncs until the crash (`None`: it does not crash).
    until_crash: Option<u64>,
    crashed: bool,
}

#[derive(Debug, Default)]
struct Image {
    /// What survives a crash.
    synced: Vec<u8>,
    /// What the program sees: `synced` plus the writes not synced yet.
    cached: Vec<u8>,
}

impl LossyDisk {
    /// An empty disk that crashes at its `crash_after`-th write or sync (`None`: never).
    pub fn new(crash_after: Option<u64>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(Machine {
            files: std::collections::BTreeMap::new(),
            until_crash: crash_after,
            crashed: false,
        })))
    }

    fn machine(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it has crashed.
    pub fn crashed(&self) -> bool {
        self.machine().crashed
    }

    /// Crashes now (if it has not yet): what was not synced is lost.
    pub fn crash_now(&self) {
        self.machine().crash();
    }

    /// Restarts the machine after a crash: each file holds what was synced, takes calls again
    /// and does not crash again.
    pub fn restart(&self) {
        let mut machine = self.machine();
        machine.crash();
        machine.crashed = false;
        machine.until_crash = None;
    }

    /// A redb storage backend on this disk's one unnamed file.
    pub fn backend(&self) -> LossyBackend {
        self.file(std::path::Path::new(""))
    }

    /// A redb storage backend on this disk's file at `path`.
    pub fn file(&self, path: &std::path::Path) -> LossyBackend {
        LossyBackend {
            disk: self.clone(),
            path: path.to_owned(),
        }
    }

    /// Opens redb databases on this disk's files, in place of the file system's
    /// (see [`crate::redb_file::Opener`]).
    pub fn opener(&self) -> crate::redb_file::Opener {
        let disk = self.clone();
        crate::redb_file::Opener::new(move |builder: &redb::Builder, path: &std::path::Path| {
            let file = disk.file(path);
            crate::redb_file::restart_interrupted_creation(&file)?;
            builder.create_with_backend(file)
        })
    }
}

/// redb's view of one file of a [`LossyDisk`].
#[derive(Debug)]
pub struct LossyBackend {
    disk: LossyDisk,
    path: std::path::PathBuf,
}

impl Machine {
    fn crash(&mut self) {
        if !self.crashed {
            self.crashed = true;
            for image in self.files.values_mut() {
                image.cached = image.synced.clone();
            }
        }
    }

    /// Counts a write or sync toward the crash; then the file at `path`, unless crashed.
    fn step(&mut self, path: &std::path::Path) -> std::io::Result<&mut Image> {
        if let Some(left) = self.until_crash.as_mut() {
            if *left == 0 {
                self.crash();
            } else {
                *left -= 1;
            }
        }
        self.image(path)
    }

    fn image(&mut self, path: &std::path::Path) -> std::io::Result<&mut Image> {
        if self.crashed {
            return Err(std::io::Error::other("the machine crashed"));
        }
        Ok(self.files.entry(path.to_owned()).or_default())
    }
}

impl LossyBackend {
    fn with<T>(
        &self,
        write: bool,
        then: impl FnOnce(&mut Image) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let mut machine = self.disk.machine();
        let image = if write {
            machine.step(&self.path)?
        } else {
            machine.image(&self.path)?
        };
        then(image)
    }
}

impl redb::StorageBackend for LossyBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.with(false, |image| Ok(image.cached.len() as u64))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.with(false, |image| {
            let start = usize::try_from(offset).map_err(std::io::Error::other)?;
            let bytes = image.cached.get(start..start + out.len()).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end")
            })?;
            out.copy_from_slice(bytes);
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.with(true, |image| {
            let len = usize::try_from(len).map_err(std::io::Error::other)?;
            image.cached.resize(len, 0);
            Ok(())
        })
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.with(true, |image| {
            image.synced = image.cached.clone();
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.with(true, |image| {
            let start = usize::try_from(offset).map_err(std::io::Error::other)?;
            let end = start + data.len();
            if image.cached.len() < end {
                image.cached.resize(end, 0);
            }
            image.cached[start..end].copy_from_slice(data);
            Ok(())
        })
    }
}

/// A small seeded generator (splitmix64), so a seed means the same run everywhere: a failing
/// seed of a fault test replays.
#[derive(Debug, Clone)]
pub struct Seeded(u64);

impl Seeded {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// The runs of a seeded fault test: `AGENTSTORE_SEED` alone when it is set (to replay one),
/// else seeds `0..count`.
pub fn seeds(count: u64) -> Vec<u64> {
    match std::env::var("AGENTSTORE_SEED") {
        Ok(seed) => vec![seed.parse().expect("AGENTSTORE_SEED is a number")],
        Err(_) => (0..count).collect(),
    }
}

/// Fails listing every failed seed and how to replay one, if any failed.
pub fn assert_no_failed_seed(failed: &[String]) {
    assert!(
        failed.is_empty(),
        "replay one with AGENTSTORE_SEED=<seed>:\n{}",
        failed.join("\n")
    );
}

/// What a crash test expects of its writes: a workload of puts, deletes and counter
/// additions, the state the acknowledged ones make, and the one write in flight at the crash,
/// which may or may not have applied (whole).
#[derive(Debug, Default)]
pub struct CrashModel {
    acknowledged: std::collections::BTreeMap<crate::Key, Expected>,
    in_doubt: Option<(crate::Key, Expected)>,
}

/// What a key should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// A register's value (`None`: deleted or never written).
    Value(Option<Vec<u8>>),
    /// A PN-counter's total.
    Counter(i64),
}

impl Expected {
    /// What a stored value reads as (`None`: nothing, or a tombstone).
    pub fn of(value: Option<&agentstore_core::record::Value>) -> Option<Self> {
        use agentstore_core::record::Value;
        match value {
            None | Some(Value::Register(None)) => None,
            Some(Value::Register(bytes)) => Some(Self::Value(bytes.clone())),
            Some(Value::PnCounter(counter)) => Some(Self::Counter(counter.value())),
            Some(other) => Some(Self::Value(Some(format!("{other:?}").into_bytes()))),
        }
    }

    /// As a read shows it: a deleted value reads as nothing.
    fn read(expected: Option<Self>) -> Option<Self> {
        match expected {
            Some(Self::Value(None)) => None,
            other => other,
        }
    }
}

impl CrashModel {
    /// The `i`-th write: a put (60 %) or a delete (10 %) of one of `keys` registers (`k:…`),
    /// or an addition to one of `counters` PN-counters (`c:…`, 30 %; `counters` 0: puts
    /// instead); with the state it leaves if it applies.
    pub fn next_write(
        &self,
        rng: &mut Seeded,
        i: u64,
        keys: u64,
        counters: u64,
    ) -> (crate::Key, crate::Mutation, Expected) {
        use crate::Mutation;
        let key: crate::Key = format!("k:{}", rng.below(keys)).parse().expect("a key");
        match rng.below(10) {
            6 => (key, Mutation::Delete, Expected::Value(None)),
            7..=9 if counters > 0 => {
                let counter: crate::Key =
                    format!("c:{}", rng.below(counters)).parse().expect("a key");
                let delta = rng.below(9) as i64 - 4;
                let before = match self.acknowledged.get(&counter) {
                    Some(Expected::Counter(total)) => *total,
                    _ => 0,
                };
                (
                    counter,
                    Mutation::PnCounterAdd(delta),
                    Expected::Counter(before + delta),
                )
            }
            _ => {
                let value = format!("{i}").into_bytes();
                (
                    key,
                    Mutation::Put(value.clone()),
                    Expected::Value(Some(value)),
                )
            }
        }
    }

    /// The write to `key` was acknowledged: it must survive.
    pub fn acknowledged(&mut self, key: crate::Key, after: Expected) {
        self.acknowledged.insert(key, after);
    }

    /// The write to `key` was in flight at the crash: it may have applied.
    pub fn in_doubt(&mut self, key: crate::Key, after: Expected) {
        self.in_doubt = Some((key, after));
    }

    /// Every key written.
    pub fn keys(&self) -> Vec<crate::Key> {
        self.acknowledged
            .keys()
            .chain(self.in_doubt.iter().map(|(key, _)| key))
            .cloned()
            .collect()
    }

    /// Whether `found` (what `key` reads as after the restart) is what the acknowledged
    /// writes made, or what the write in doubt made.
    pub fn check(&self, key: &crate::Key, found: Option<Expected>) -> Result<(), String> {
        let acknowledged = Expected::read(self.acknowledged.get(key).cloned());
        let doubtful = self
            .in_doubt
            .as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, after)| Expected::read(Some(after.clone())));
        if found == acknowledged || doubtful.as_ref() == Some(&found) {
            return Ok(());
        }
        Err(format!(
            "{key}: acknowledged {acknowledged:?} (in doubt: {doubtful:?}), found {found:?}"
        ))
    }
}
