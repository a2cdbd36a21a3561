//! A spawned binary that cannot outlive its test, and where to find the workspace's binaries.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How many lines of a process's output are printed when a test fails while it runs.
const TAIL_ON_PANIC: usize = 200;

/// A running child process: stdout and stderr are read line by line on two threads into a shared buffer (so a
/// test can wait for a line, and a failing test shows what the process said); on drop it is killed with
/// SIGKILL by its PID ([`Child::kill`]) and reaped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    output: Arc<Output>,
}

/// What a process wrote, and how many of its streams are still open.
#[derive(Debug, Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    open: AtomicUsize,
}

impl Process {
    /// Spawns `cmd` (stdin closed, stdout and stderr captured). `name` labels its output.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Process> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start {name} ({cmd:?}): {e}"))?;
        let output = Arc::new(Output::default());
        if let Some(out) = child.stdout.take() {
            read_lines(name, "stdout", out, output.clone())?;
        }
        if let Some(err) = child.stderr.take() {
            read_lines(name, "stderr", err, output.clone())?;
        }
        Ok(Process { name: name.to_owned(), child, output })
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line it has written so far (stdout and stderr interleaved, each prefixed `stdout| ` or `stderr| `).
    pub fn lines(&self) -> Vec<String> {
        self.output.lines.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Its last `n` lines, one string, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The exit status if it has exited (reaping it), else `None`.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends it SIGTERM (by its PID): what the kubelet sends a Pod it deletes, which starts a drain.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.pid())?)
            .ok_or_else(|| anyhow::anyhow!("{} has PID 0", self.name))?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .map_err(|e| anyhow::anyhow!("cannot send SIGTERM to {} (pid {}): {e}", self.name, self.pid()))
    }

    /// Waits (bounded) for it to exit and returns its status, reaping it. Polls rather than blocks, so the
    /// test's runtime keeps serving the stand-in Pods and clients meanwhile.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("{} still runs after {timeout:?}; its last output:\n{}", self.name, self.tail(40));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails if the process has exited, with its status and last lines.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => {
                // Its last words may still be in the pipes: let the readers reach EOF (bounded).
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.output.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                anyhow::bail!("{} exited ({status}); its last output:\n{}", self.name, self.tail(40))
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL by PID, then reap: no process survives its test, and none is left a zombie.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} (pid {}): last output -----\n{}", self.name, self.child.id(), self.tail(TAIL_ON_PANIC));
        }
    }
}

fn read_lines(
    name: &str,
    stream: &'static str,
    from: impl Read + Send + 'static,
    into: Arc<Output>,
) -> anyhow::Result<()> {
    into.open.fetch_add(1, Ordering::SeqCst);
    // The thread ends at EOF, which comes when the process dies; it is not joined, so a grandchild holding
    // the pipe open cannot hang a test.
    std::thread::Builder::new().name(format!("{name}-{stream}")).spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = format!("{stream}| {}", line.trim_end_matches(['\n', '\r']));
                    into.lines.lock().unwrap_or_else(PoisonError::into_inner).push(line);
                }
            }
        }
        into.open.fetch_sub(1, Ordering::SeqCst);
    })?;
    Ok(())
}

/// Waits (bounded) for `process` to write a line starting with `prefix` on stdout or stderr, and returns the
/// line (without the stream marker). Fails early if the process exits.
pub async fn wait_for_line(process: &mut Process, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let found = process.lines().into_iter().find_map(|l| {
            let text = l.split_once("| ").map_or(l.as_str(), |(_, t)| t);
            text.starts_with(prefix).then(|| text.to_owned())
        });
        if let Some(line) = found {
            return Ok(line);
        }
        process.check_running().map_err(|e| e.context(format!("waiting for a line starting {prefix:?}")))?;
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "{} wrote no line starting {prefix:?} within {timeout:?}; its output so far:\n{}",
                process.name(),
                process.tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The path of a binary of this workspace (e.g. `mesh-control`), built by `cargo build --workspace --bins`.
///
/// `env!("CARGO_BIN_EXE_…")` only exists for binaries of the test's own package, so the binary is looked up
/// next to the running test: test executables live in `<target-dir>/<profile>/deps/`, binaries in
/// `<target-dir>/<profile>/`. `MESH_BIN_DIR` overrides the folder.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        let path = Path::new(&dir).join(&file);
        anyhow::ensure!(path.is_file(), "MESH_BIN_DIR is set but {} does not exist", path.display());
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    // deps/ → <profile>/ (and one more level, for test binaries placed elsewhere under the profile).
    let looked: Vec<PathBuf> = exe.ancestors().skip(1).take(3).map(|d| d.join(&file)).collect();
    if let Some(found) = looked.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    anyhow::bail!(
        "the `{name}` binary was not found (looked for {}). The end-to-end tests run the built binaries: run \
         `cargo build --workspace --bins` first, with the same CARGO_TARGET_DIR and profile as the tests, \
         or point MESH_BIN_DIR at the folder holding them",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_a_line_and_kills_on_drop() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo starting >&2; echo 'ready at 127.0.0.1:1'; exec sleep 600"]);
        let mut p = Process::spawn("sleeper", cmd).unwrap();
        let line = wait_for_line(&mut p, "ready at ", Duration::from_secs(10)).await.unwrap();
        assert_eq!(line, "ready at 127.0.0.1:1");
        assert!(p.lines().contains(&"stderr| starting".to_owned()), "{:?}", p.lines());
        let pid = p.pid();
        drop(p);
        // Killed and reaped: the PID no longer names a process (not even a zombie).
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} survived its guard");
    }

    #[tokio::test]
    async fn a_process_that_exits_fails_the_wait_at_once() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo 'bad flag' >&2; exit 3"]);
        let mut p = Process::spawn("quitter", cmd).unwrap();
        let err = wait_for_line(&mut p, "never", Duration::from_secs(30)).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exited") && msg.contains("bad flag"), "{msg}");
    }

    #[test]
    fn a_missing_binary_says_to_build_the_workspace() {
        let err = workspace_bin("no-such-binary-of-mesh").unwrap_err().to_string();
        assert!(err.contains("cargo build --workspace --bins"), "{err}");
    }
}
