//! Starts and stops a private PostgreSQL cluster from the local PostgreSQL binaries.
//!
//! Used by the service when no `DATABASE_URL` is given and by the integration tests. The cluster
//! listens on 127.0.0.1 only, on a free port chosen at its first start; the port is remembered in
//! `<data dir>/pg.port` and a later start takes it again when it is free, so clients holding the
//! old URL (a service whose database was restarted) reconnect by themselves. PostgreSQL refuses
//! to run as root, so as root every PostgreSQL command runs as the unprivileged `postgres` OS user
//! (via `setpriv` or `runuser`; `sudo` is often absent).

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::Digest;

/// The OS user PostgreSQL runs as when this process is root.
const SERVICE_USER: &str = "postgres";

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found on PATH, via pg_config, under \
         /usr/lib/postgresql/*/bin or Homebrew's opt/postgresql@*/bin.\n  Install them (PostgreSQL 15 or \
         newer; Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql@16`),\n  or point the service at a running server with \
         DATABASE_URL=postgres://user:pass@host/db,\n  or start one with `docker compose up -d postgres` and use \
         DATABASE_URL=postgres://inventory:inventory@127.0.0.1:5432/inventory"
    )]
    NoBinaries,
    #[error(
        "running as root, PostgreSQL must run as the unprivileged OS user `{SERVICE_USER}`, which does not \
         exist: create it (`useradd --system postgres`) or set DATABASE_URL"
    )]
    NoServiceUser,
    #[error("running as root needs `setpriv` or `runuser` to start PostgreSQL as `{SERVICE_USER}`")]
    NoPrivilegeDrop,
    #[error(
        "the data directory {0} is not reachable by the OS user `{SERVICE_USER}` that PostgreSQL runs as; \
         choose a --data-dir whose parent directories it can enter (for example under /tmp or /var/lib)"
    )]
    Unreachable(PathBuf),
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Tuning for a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is flushed to disk: what the service uses.
    Durable,
    /// fsync off: for throwaway test clusters only.
    Throwaway,
}

/// A running cluster started (or found running) by this module.
#[derive(Debug)]
pub struct LocalPostgres {
    bin_dir: PathBuf,
    cluster_dir: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    /// This process started the postmaster (rather than attaching to a running one).
    launched: bool,
}

#[derive(Debug, Clone)]
struct RunAs {
    tool: PrivDrop,
    home: String,
}

#[derive(Debug, Clone, Copy)]
enum PrivDrop {
    Setpriv,
    Runuser,
}

impl LocalPostgres {
    /// Starts the cluster kept under `data_dir` (creating it on first use), or attaches to it when
    /// it is already running. Blocking: call it from a blocking thread in async code.
    pub fn start(data_dir: &Path, durability: Durability) -> Result<Self, LocalPgError> {
        let bin_dir = find_bin_dir().ok_or(LocalPgError::NoBinaries)?;
        let run_as = if is_root() { Some(RunAs::detect()?) } else { None };
        std::fs::create_dir_all(data_dir).map_err(|source| LocalPgError::Io { path: data_dir.into(), source })?;
        let data_dir = data_dir.canonicalize().map_err(|source| LocalPgError::Io { path: data_dir.into(), source })?;
        let mut pg = Self { bin_dir, cluster_dir: data_dir.join("pg"), port: 0, run_as, launched: false };
        pg.cluster_dir = pg.cluster_location(&data_dir)?;

        if !pg.cluster_dir.join("PG_VERSION").exists() {
            pg.init(durability)?;
        }
        if let Some(port) = pg.running_port() {
            tracing::info!(port, dir = %pg.cluster_dir.display(), "attached to running local PostgreSQL");
            pg.port = port;
            return Ok(pg);
        }
        pg.launch(durability)?;
        Ok(pg)
    }

    /// Where the cluster lives: `<data dir>/pg`, unless this process is root and the service
    /// user cannot reach the data directory (say, a checkout under a private /root). Then the
    /// cluster lives under /var/lib/inventory/<hash of the data dir>/pg and `<data dir>/pg` is a
    /// symlink to it, so the data still belongs to that data directory and survives restarts.
    fn cluster_location(&self, data_dir: &Path) -> Result<PathBuf, LocalPgError> {
        let link = data_dir.join("pg");
        if let Ok(target) = std::fs::read_link(&link) {
            return Ok(target);
        }
        if self.run_as.is_none() || link.exists() {
            return Ok(link);
        }
        let reachable = self.pg_command_raw("test", &["-x", &data_dir.display().to_string()])?.status.success();
        if reachable {
            return Ok(link);
        }
        let digest = sha2::Sha256::digest(data_dir.display().to_string().as_bytes());
        let home = PathBuf::from("/var/lib/inventory").join(hex::encode(&digest[..8]));
        std::fs::create_dir_all(&home).map_err(|source| LocalPgError::Io { path: home.clone(), source })?;
        let target = home.join("pg");
        std::os::unix::fs::symlink(&target, &link).map_err(|source| LocalPgError::Io { path: link.clone(), source })?;
        tracing::warn!(
            data_dir = %data_dir.display(),
            cluster = %target.display(),
            "the data directory is not reachable by the `postgres` user; the cluster lives elsewhere, linked from it"
        );
        Ok(target)
    }

    /// Starts a hot standby of this (running) cluster kept under `data_dir`: on first use a base
    /// backup streamed from this cluster (`pg_basebackup -R -X stream`), which the standby then
    /// follows by streaming replication. Later calls start (or attach to) that standby again.
    /// Needs replication connections from 127.0.0.1, which initdb's `pg_hba.conf` trusts with
    /// `--auth=trust`, and `wal_level` replica (the default). Blocking.
    pub fn start_standby(&self, data_dir: &Path, durability: Durability) -> Result<Self, LocalPgError> {
        if !self.bin_dir.join("pg_basebackup").is_file() {
            return Err(LocalPgError::NoBinaries);
        }
        std::fs::create_dir_all(data_dir).map_err(|source| LocalPgError::Io { path: data_dir.into(), source })?;
        let data_dir = data_dir.canonicalize().map_err(|source| LocalPgError::Io { path: data_dir.into(), source })?;
        let mut pg = Self {
            bin_dir: self.bin_dir.clone(),
            cluster_dir: data_dir.join("pg"),
            port: 0,
            run_as: self.run_as.clone(),
            launched: false,
        };
        pg.cluster_dir = pg.cluster_location(&data_dir)?;
        if !pg.cluster_dir.join("PG_VERSION").exists() {
            std::fs::create_dir_all(&pg.cluster_dir)
                .map_err(|source| LocalPgError::Io { path: pg.cluster_dir.clone(), source })?;
            // PostgreSQL refuses a data directory others may read.
            std::fs::set_permissions(&pg.cluster_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|source| LocalPgError::Io { path: pg.cluster_dir.clone(), source })?;
            if pg.run_as.is_some() {
                pg.hand_over_to_service_user()?;
            }
            let (dir, port) = (pg.dir_arg(), self.port.to_string());
            let mut args = vec![
                "-D",
                &dir,
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--checkpoint=fast",
            ];
            if durability == Durability::Throwaway {
                args.push("--no-sync");
            }
            let out = pg.pg_command("pg_basebackup", &args)?;
            if !out.status.success() {
                return Err(command_error("pg_basebackup", &out));
            }
        }
        if let Some(port) = pg.running_port() {
            pg.port = port;
            return Ok(pg);
        }
        pg.launch(durability)?;
        Ok(pg)
    }

    /// Whether this process started the cluster (and so should stop it when a one-off command
    /// ends), rather than attaching to one a running service owns.
    pub fn launched(&self) -> bool {
        self.launched
    }

    /// A connection URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` over the cluster's Unix-domain socket when it has one
    /// (no TCP stack in between: less CPU per round trip), else [`LocalPostgres::url`].
    pub fn socket_url(&self, database: &str) -> String {
        match self.socket_dir().filter(|dir| dir.join(format!(".s.PGSQL.{}", self.port)).exists()) {
            Some(dir) => format!("postgres://postgres@localhost/{database}?host={}&port={}", dir.display(), self.port),
            None => self.url(database),
        }
    }

    /// Where the cluster puts its socket: its own directory, unless the socket's path would
    /// be too long for the kernel (108 bytes) or need quoting in a URL.
    fn socket_dir(&self) -> Option<&Path> {
        let dir = self.cluster_dir.to_str()?;
        let plain = dir.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        (plain && dir.len() + "/.s.PGSQL.65535".len() < 108).then_some(self.cluster_dir.as_path())
    }

    /// Stops the cluster (fast shutdown: connections are closed, committed data is safe).
    pub fn stop(&self) -> Result<(), LocalPgError> {
        let out = self.pg_command("pg_ctl", &["stop", "-D", &self.dir_arg(), "-m", "fast", "-w", "-t", "60"])?;
        if out.status.success() || self.running_port().is_none() {
            tracing::info!(dir = %self.cluster_dir.display(), "local PostgreSQL stopped");
            Ok(())
        } else {
            Err(command_error("pg_ctl stop", &out))
        }
    }

    /// A shell command line that stops this cluster immediately, for a watchdog that outlives us.
    pub fn stop_command_line(&self) -> String {
        let mut argv = self.prefix();
        argv.push(self.bin_dir.join("pg_ctl").display().to_string());
        argv.extend(["stop", "-D", &self.dir_arg(), "-m", "immediate", "-w"].map(String::from));
        argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
    }

    fn dir_arg(&self) -> String {
        self.cluster_dir.display().to_string()
    }

    fn init(&self, durability: Durability) -> Result<(), LocalPgError> {
        std::fs::create_dir_all(&self.cluster_dir)
            .map_err(|source| LocalPgError::Io { path: self.cluster_dir.clone(), source })?;
        if self.run_as.is_some() {
            self.hand_over_to_service_user()?;
        }
        let dir = self.dir_arg();
        let mut args = vec!["-D", &dir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"];
        if durability == Durability::Throwaway {
            args.push("--no-sync");
        }
        tracing::info!(dir = %dir, "initialising local PostgreSQL cluster");
        let out = self.pg_command("initdb", &args)?;
        if !out.status.success() {
            return Err(command_error("initdb", &out));
        }
        Ok(())
    }

    fn hand_over_to_service_user(&self) -> Result<(), LocalPgError> {
        let out = Command::new("chown")
            .args(["-R", &format!("{SERVICE_USER}:"), &self.dir_arg()])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| LocalPgError::Io { path: "chown".into(), source })?;
        if !out.status.success() {
            return Err(command_error("chown", &out));
        }
        // The service user must be able to enter every parent directory.
        let probe = self.pg_command_raw("test", &["-w", &self.dir_arg()])?;
        if !probe.status.success() {
            return Err(LocalPgError::Unreachable(self.cluster_dir.clone()));
        }
        Ok(())
    }

    /// The port of the postmaster serving this cluster, if one is alive.
    fn running_port(&self) -> Option<u16> {
        let status = self.pg_command("pg_ctl", &["status", "-D", &self.dir_arg()]).ok()?;
        if !status.status.success() {
            return None;
        }
        // Line 4 of postmaster.pid is the port.
        let pid_file = std::fs::read_to_string(self.cluster_dir.join("postmaster.pid")).ok()?;
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    fn launch(&mut self, durability: Durability) -> Result<(), LocalPgError> {
        let mut last_error = None;
        // The previous start's port first, if nobody took it meanwhile.
        let mut preferred = self.remembered_port().filter(|&port| port_is_free(port));
        // A free port can be taken by someone else between choosing and binding it: try again.
        for _ in 0..5 {
            let port = match preferred.take() {
                Some(port) => port,
                None => free_port().map_err(|source| LocalPgError::Io { path: "127.0.0.1:0".into(), source })?,
            };
            let socket_dir = self.socket_dir().map_or(String::new(), |d| d.display().to_string());
            let mut options = format!(
                "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{socket_dir}' \
                 -c max_connections=300"
            );
            if durability == Durability::Throwaway {
                options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
            } else {
                // Room for a million-level import without a checkpoint storm, the hot part of the
                // stock table in memory, and fewer (compressed) full-page images in the WAL of
                // random updates. Commits stay durable (fsync, synchronous_commit on).
                options.push_str(" -c shared_buffers=256MB -c max_wal_size=4GB -c checkpoint_timeout=15min");
                options.push_str(&format!(" -c wal_compression={}", self.wal_compression()));
            }
            let log = self.cluster_dir.join("server.log").display().to_string();
            let dir = self.dir_arg();
            let out =
                self.pg_command("pg_ctl", &["start", "-D", &dir, "-l", &log, "-w", "-t", "60", "-o", &options])?;
            if out.status.success() {
                self.port = port;
                self.launched = true;
                self.remember_port();
                tracing::info!(port, dir = %dir, "local PostgreSQL started");
                return Ok(());
            }
            last_error = Some(command_error(&format!("pg_ctl start (log: {log})"), &out));
        }
        Err(last_error.unwrap_or(LocalPgError::NoBinaries))
    }

    /// How full-page images in the WAL are compressed: lz4 when this PostgreSQL takes it (15 or
    /// newer, built with lz4: Debian's and most packages are), else the default (pglz). Under
    /// random updates of a large table pglz costs about a tenth of all CPU (profiled:
    /// `pglz_compress`); lz4 a fraction of that.
    fn wal_compression(&self) -> &'static str {
        let major = std::fs::read_to_string(self.cluster_dir.join("PG_VERSION"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok());
        let configure = Command::new(self.bin_dir.join("pg_config"))
            .arg("--configure")
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
        wal_compression_for(major, configure.as_deref())
    }

    /// `<data dir>/pg.port`: the port of the last start, taken again by the next one when free.
    fn port_file(&self) -> PathBuf {
        self.cluster_dir.with_file_name("pg.port")
    }

    fn remembered_port(&self) -> Option<u16> {
        std::fs::read_to_string(self.port_file()).ok()?.trim().parse().ok().filter(|&port| port != 0)
    }

    /// Best effort: without the file the next start merely picks another free port.
    fn remember_port(&self) {
        if let Err(err) = std::fs::write(self.port_file(), format!("{}\n", self.port)) {
            tracing::warn!(error = %err, file = %self.port_file().display(), "cannot remember the PostgreSQL port");
        }
    }

    fn prefix(&self) -> Vec<String> {
        match &self.run_as {
            None => Vec::new(),
            Some(RunAs { tool: PrivDrop::Setpriv, home }) => vec![
                "env".into(),
                format!("HOME={home}"),
                "setpriv".into(),
                format!("--reuid={SERVICE_USER}"),
                format!("--regid={SERVICE_USER}"),
                "--init-groups".into(),
            ],
            Some(RunAs { tool: PrivDrop::Runuser, home }) => {
                vec![
                    "env".into(),
                    format!("HOME={home}"),
                    "runuser".into(),
                    "-u".into(),
                    SERVICE_USER.into(),
                    "--".into(),
                ]
            }
        }
    }

    fn pg_command(&self, program: &str, args: &[&str]) -> Result<Output, LocalPgError> {
        let program = self.bin_dir.join(program).display().to_string();
        self.pg_command_raw(&program, args)
    }

    fn pg_command_raw(&self, program: &str, args: &[&str]) -> Result<Output, LocalPgError> {
        let mut argv = self.prefix();
        argv.push(program.to_owned());
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        Command::new(&argv[0])
            .args(&argv[1..])
            // Run from a directory every user can enter, and never hand our pipes to the daemon.
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| LocalPgError::Io { path: PathBuf::from(&argv[0]), source })
    }
}

impl RunAs {
    fn detect() -> Result<Self, LocalPgError> {
        let home = passwd_home(SERVICE_USER).ok_or(LocalPgError::NoServiceUser)?;
        let tool = if which("setpriv").is_some() {
            PrivDrop::Setpriv
        } else if which("runuser").is_some() {
            PrivDrop::Runuser
        } else {
            return Err(LocalPgError::NoPrivilegeDrop);
        };
        Ok(Self { tool, home })
    }
}

/// Where the self-started cluster of `data_dir` keeps its data, for people: the data directory
/// and, when the cluster lives elsewhere (root's data directory unreachable for `postgres`), the
/// place its `pg` link points to. Nothing is started or created.
pub fn describe_data_dir(data_dir: &Path) -> String {
    let dir = data_dir.canonicalize().unwrap_or_else(|_| data_dir.to_path_buf());
    let link = dir.join("pg");
    let mut out = format!("data directory: {}", dir.display());
    match std::fs::read_link(&link) {
        Ok(target) => out.push_str(&format!("\ncluster:        {} (linked from {})", target.display(), link.display())),
        Err(_) if link.exists() => out.push_str(&format!("\ncluster:        {}", link.display())),
        Err(_) => {
            out.push_str("\ncluster:        none yet (created by the first `inventory serve` without DATABASE_URL)")
        }
    }
    out.push_str("\nto remove it: stop the service, then delete the paths above");
    out
}

/// The `wal_compression` setting for a server of this major version built with `configure`
/// (the output of `pg_config --configure`), as far as either could be read. `on` (pglz) is what
/// every version takes; `lz4` only 15 and newer (14 knows `--with-lz4`, for TOAST only).
fn wal_compression_for(major: Option<u32>, configure: Option<&str>) -> &'static str {
    let has_lz4 = configure.is_some_and(|flags| flags.split_whitespace().any(|f| f.trim_matches('\'') == "--with-lz4"));
    if has_lz4 && major.is_some_and(|m| m >= 15) { "lz4" } else { "on" }
}

/// Finds the directory holding `initdb`, `pg_ctl` and `postgres`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let complete = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    if let Some(initdb) = which("initdb") {
        // Resolve symlinks so that pg_ctl and postgres come from the same installation.
        let real = initdb.canonicalize().unwrap_or(initdb);
        if let Some(dir) = real.parent().filter(|d| complete(d)) {
            return Some(dir.to_path_buf());
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && complete(&dir) {
            return Some(dir);
        }
    }
    // Debian/Ubuntu: /usr/lib/postgresql/15/bin; Homebrew's keg-only formulae (not on PATH):
    // /opt/homebrew/opt/postgresql@15/bin (Apple silicon), /usr/local/opt/postgresql@15/bin (Intel).
    let installs =
        [("/usr/lib/postgresql", ""), ("/opt/homebrew/opt", "postgresql@"), ("/usr/local/opt", "postgresql@")];
    let mut versions: Vec<(u32, PathBuf)> = installs
        .iter()
        .flat_map(|(root, prefix)| std::fs::read_dir(root).into_iter().flatten().flatten().map(move |e| (e, *prefix)))
        .filter_map(|(entry, prefix)| {
            let version = entry.file_name().to_str()?.strip_prefix(prefix)?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

fn is_root() -> bool {
    // /proc/self belongs to the effective user of this process.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn passwd_home(user: &str) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user)).then(|| fields.get(5).copied().unwrap_or("/").to_owned())
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn command_error(what: &str, out: &Output) -> LocalPgError {
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if detail.is_empty() {
        detail = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    LocalPgError::Command { what: what.to_owned(), detail: format!("{} ({})", detail, out.status) }
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_compression_is_lz4_only_when_the_server_takes_it() {
        let debian = "'--prefix=/usr' '--with-icu' '--with-lz4' '--with-zstd' '--enable-nls'";
        assert_eq!(wal_compression_for(Some(15), Some(debian)), "lz4");
        assert_eq!(wal_compression_for(Some(17), Some(debian)), "lz4");
        // 14 has the flag, but its wal_compression is a boolean: lz4 would stop it starting.
        assert_eq!(wal_compression_for(Some(14), Some(debian)), "on");
        assert_eq!(wal_compression_for(None, Some(debian)), "on");
        assert_eq!(wal_compression_for(Some(15), Some("'--prefix=/usr' '--with-lz4-extra' '--with-zstd'")), "on");
        assert_eq!(wal_compression_for(Some(15), Some("")), "on");
        assert_eq!(wal_compression_for(Some(15), None), "on");
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn passwd_lookup_finds_root() {
        // Linux keeps root's home in /root, macOS in /var/root.
        let home = passwd_home("root");
        assert!(matches!(home.as_deref(), Some("/root" | "/var/root")), "{home:?}");
        assert_eq!(passwd_home("no-such-user-here"), None);
    }
}
