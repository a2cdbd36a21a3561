//! The manifest-folder source: a directory of YAML/JSON manifests, read the way `kubectl apply -f DIR` reads it,
//! and watched so that edits reach the store without a restart.
//!
//! The folder is always loaded whole: it is small, and a full reload cannot drift from the files the way
//! per-file patching can. [`super::sync`] turns each full listing into store changes, so translation still
//! recomputes only what changed. A bad document never stops the rest of the folder: it becomes a [`Rejected`]
//! naming the file, the document and why, logged at warn level.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::model::{self, ModelError, Object, ObjectRef, Parsed};

/// File extensions `kubectl apply -f DIR` reads (case-sensitive, as kubectl compares them).
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// A burst of events that never goes quiet still reloads after this many debounce periods, so a folder that is
/// written continuously (a log someone put there by mistake) cannot starve updates.
const MAX_DEBOUNCE_PERIODS: u32 = 10;

/// How often the watcher retries while the folder cannot be read or watched (deleted, being replaced).
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Errors of the manifest-folder source. Only the folder as a whole can fail; bad files and documents are
/// [`Rejected`] entries instead, so one typo never hides the rest of the folder.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The folder cannot be listed.
    #[error("cannot read manifest folder {}: {error} (check that it exists, is a directory and is readable)", dir.display())]
    ReadDir {
        /// The folder.
        dir: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The folder cannot be watched.
    #[error(
        "cannot watch manifest folder {}: {error} (on Linux, check the inotify limits \
         fs.inotify.max_user_instances and fs.inotify.max_user_watches)",
        dir.display()
    )]
    Watch {
        /// The folder.
        dir: PathBuf,
        /// What the watcher said.
        error: notify::Error,
    },
    /// The watcher thread could not be started.
    #[error("cannot start the manifest folder watcher thread: {0} (check the process and thread limits)")]
    Thread(std::io::Error),
}

/// What loading a folder produced: the objects to hold, and what was set aside and why.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The objects of the kinds we read, in file order then document order; each [`ObjectRef`] at most once.
    pub objects: Vec<Object>,
    /// Files and documents that could not be used, in the order they were met.
    pub rejected: Vec<Rejected>,
    /// Valid objects of kinds we do not read (Deployments, ConfigMaps, non-TLS Secrets, ...): counted so that a
    /// folder copied from a real application is visibly understood, not silently half-read.
    pub ignored: usize,
}

/// A file or document that could not be used, with enough detail for the user to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The file (inside the folder).
    pub file: PathBuf,
    /// The 1-based document in the file (`---`-separated for YAML; a JSON file is one document); 0 when the
    /// whole file is rejected (it could not be read).
    pub document: usize,
    /// The object, e.g. `Service shop/web`, when known.
    pub object: Option<String>,
    /// Why, naming the field where the schema check said so.
    pub reason: String,
    /// The object whose new definition is invalid, when known: [`super::sync`] keeps its last good version.
    pub keep: Option<ObjectRef>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", file_name(&self.file))?;
        if self.document > 0 {
            write!(f, " (document {})", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// The name users know a file by: files are only ever directly in the folder, so the name is unambiguous.
fn file_name(path: &Path) -> Cow<'_, str> {
    path.file_name().unwrap_or(path.as_os_str()).to_string_lossy()
}

/// Whether a directory entry is a manifest: a `.yaml`, `.yml` or `.json` file that is not hidden (dotfiles,
/// editor locks like `.#x.yaml`, vim swap files, the `..data` links of a mounted ConfigMap) nor a backup (`x~`).
fn is_manifest_name(name: &OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    if bytes.starts_with(b".") || bytes.ends_with(b"~") {
        return false;
    }
    Path::new(name).extension().and_then(OsStr::to_str).is_some_and(|ext| EXTENSIONS.contains(&ext))
}

/// The manifest files directly in `dir`, sorted by path so loads are deterministic.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let err = |error| SourceError::ReadDir { dir: dir.to_owned(), error };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        if !is_manifest_name(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        // Follow symlinks (a mounted ConfigMap is a folder of links into `..data/`). A link that cannot be
        // followed stays in the list, so reading it reports why instead of it silently vanishing.
        if fs::metadata(&path).is_ok_and(|m| !m.is_file()) {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest file directly in `dir` (not recursively, like `kubectl apply -f DIR`), in sorted path
/// order, and parses every document into [`Loaded`].
///
/// Only an unreadable folder is an error. An unreadable file, a syntax error or an invalid object rejects just
/// that file or document (a YAML syntax error also loses the rest of its file, since the parser cannot resume);
/// an object defined twice keeps its first definition. Each rejection is logged at warn level.
pub fn load_dir(dir: &Path) -> Result<Loaded, SourceError> {
    let mut loader = Loader::default();
    for file in manifest_files(dir)? {
        loader.file(&file);
    }
    for r in &loader.loaded.rejected {
        warn!(file = %r.file.display(), document = r.document, "manifest rejected: {r}");
    }
    Ok(loader.loaded)
}

/// Accumulates one folder load.
#[derive(Default)]
struct Loader {
    loaded: Loaded,
    /// Where each object was first defined: (file, document).
    first: HashMap<ObjectRef, (PathBuf, usize)>,
}

impl Loader {
    fn reject(&mut self, file: &Path, document: usize, object: Option<String>, reason: String) {
        self.loaded.rejected.push(Rejected { file: file.to_owned(), document, object, reason, keep: None });
    }

    fn file(&mut self, path: &Path) {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => return self.reject(path, 0, None, format!("cannot read the file: {e}")),
        };
        if path.extension() == Some(OsStr::new("json")) {
            if text.trim().is_empty() {
                return;
            }
            match serde_json::from_str::<Value>(&text) {
                Ok(doc) => self.document(path, 1, doc),
                Err(e) => self.reject(path, 1, None, format!("invalid JSON: {e}")),
            }
            return;
        }
        let mut last_error: Option<String> = None;
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            match Value::deserialize(de) {
                Ok(doc) => {
                    last_error = None;
                    self.document(path, i + 1, doc);
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() == Some(&e) {
                        // The parser cannot resume after a syntax error: it repeats the same error (same
                        // position) for every further document, forever. Stop, and say what was lost.
                        if let Some(r) = self.loaded.rejected.last_mut() {
                            r.reason.push_str(" (the rest of the file is skipped)");
                        }
                        break;
                    }
                    self.reject(path, i + 1, None, format!("invalid YAML: {e}"));
                    last_error = Some(e);
                }
            }
        }
    }

    fn document(&mut self, path: &Path, document: usize, doc: Value) {
        // Same test as `model::parse_document`, to number the items of a `List` in rejections.
        let is_list = doc.get("kind").and_then(Value::as_str).is_some_and(|k| k.ends_with("List"))
            && doc.get("items").is_some_and(Value::is_array);
        for (item, parsed) in model::parse_document(doc).into_iter().enumerate() {
            match parsed {
                Ok(Parsed::Object(obj)) => {
                    let r = obj.object_ref();
                    if let Some((file, doc)) = self.first.get(&r) {
                        let reason = format!(
                            "defined again; the first definition, in {} (document {doc}), is kept",
                            file_name(file)
                        );
                        self.reject(path, document, Some(r.to_string()), reason);
                    } else {
                        self.first.insert(r, (path.to_owned(), document));
                        self.loaded.objects.push(obj);
                    }
                }
                Ok(Parsed::Ignored { kind, name }) => {
                    debug!(file = %path.display(), document, "ignoring {kind} {name}: not a kind we read");
                    self.loaded.ignored += 1;
                }
                Err(ModelError::Invalid { kind, name, reason, object }) => {
                    self.reject(path, document, Some(format!("{kind} {name}")), format!("invalid {kind}: {reason}"));
                    if let Some(r) = self.loaded.rejected.last_mut() {
                        r.keep = object.map(|o| *o);
                    }
                }
                Err(e) if is_list => self.reject(path, document, None, format!("List item {}: {e}", item + 1)),
                Err(e) => self.reject(path, document, None, e.to_string()),
            }
        }
    }
}

/// Keeps a folder watch running; dropping it stops the watcher (its channel then closes).
#[derive(Debug)]
pub struct WatchHandle {
    stop: std_mpsc::Sender<Msg>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        // The thread may already be gone (its receiver was dropped); nothing to do then.
        let _ = self.stop.send(Msg::Stop);
    }
}

/// What the watcher thread waits on: notify's events and the handle's stop.
#[derive(Debug)]
enum Msg {
    Event(notify::Result<Event>),
    Stop,
}

/// Loads `dir` and keeps watching it: the returned channel first carries the initial load, then a fresh
/// [`Loaded`] of the whole folder after every burst of changes, once no change came for `debounce` (or at the
/// latest after ten `debounce` periods of continuous changes).
///
/// The directory is watched, not the files, so editors that save by writing a temporary file and renaming it
/// over the original, and ConfigMap volume updates (an atomic swap of the `..data` link), are seen. While the
/// folder cannot be read (deleted, being replaced) nothing is sent — the last load stays in force, never an empty
/// one — and the watcher retries every second, re-establishing the watch when the folder is back.
///
/// Loading happens on a dedicated thread (file reads block); this function does the first load itself, before
/// returning, so it fails if the folder cannot be read or watched. It needs no Tokio runtime. When the consumer
/// falls behind, the thread waits for it, and changes made meanwhile are folded into the next load.
pub fn watch(dir: PathBuf, debounce: Duration) -> Result<(mpsc::Receiver<Loaded>, WatchHandle), SourceError> {
    let (events_tx, events_rx) = std_mpsc::channel();
    let notify_tx = events_tx.clone();
    let mut watcher = notify::recommended_watcher(move |event| {
        // Only fails once the watcher thread is gone, and then nobody is listening.
        let _ = notify_tx.send(Msg::Event(event));
    })
    .map_err(|error| SourceError::Watch { dir: dir.clone(), error })?;
    // Watch before the first load, so a change racing the load triggers a reload instead of being missed.
    if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        // A missing folder is better said as such than as a watch failure.
        load_dir(&dir)?;
        return Err(SourceError::Watch { dir, error });
    }
    let first = load_dir(&dir)?;
    info!(dir = %dir.display(), objects = first.objects.len(), rejected = first.rejected.len(),
        ignored = first.ignored, "manifest folder loaded");
    let (out, rx) = mpsc::channel(2);
    out.try_send(first).expect("a new channel has room for the first load");
    let watched = if dir.is_absolute() {
        dir.clone()
    } else {
        // notify names events by the absolute path, made this same way.
        std::env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or_else(|_| dir.clone())
    };
    let worker = Worker { dir, watched, debounce, watcher, events: events_rx, out };
    thread::Builder::new().name("mesh-manifests".into()).spawn(move || worker.run()).map_err(SourceError::Thread)?;
    Ok((rx, WatchHandle { stop: events_tx }))
}

/// The watcher thread's state.
struct Worker {
    dir: PathBuf,
    /// `dir` as notify names it in events about the folder itself.
    watched: PathBuf,
    debounce: Duration,
    watcher: RecommendedWatcher,
    events: std_mpsc::Receiver<Msg>,
    out: mpsc::Sender<Loaded>,
}

impl Worker {
    fn run(mut self) {
        // The folder could not be read or watched last time: retry on a timer, since no event may ever come.
        let mut failing = false;
        // An event was about the folder itself (deleted, moved): its watch is gone and must be made again.
        let mut rewatch = false;
        loop {
            let first = if failing {
                self.events.recv_timeout(RETRY_EVERY)
            } else {
                self.events.recv().map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
            };
            match first {
                Ok(Msg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Event(event)) => {
                    if !self.triggers(&event, &mut rewatch) {
                        continue;
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            }
            if !self.settle(&mut rewatch) {
                return;
            }
            if rewatch || failing {
                // Fails when notify already dropped the watch with the folder; that is fine.
                let _ = self.watcher.unwatch(&self.dir);
                if let Err(error) = self.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                    let e = SourceError::Watch { dir: self.dir.clone(), error };
                    self.failed(&mut failing, &e);
                    continue;
                }
                rewatch = false;
            }
            match load_dir(&self.dir) {
                Ok(loaded) => {
                    failing = false;
                    info!(dir = %self.dir.display(), objects = loaded.objects.len(), rejected = loaded.rejected.len(),
                        ignored = loaded.ignored, "manifest folder reloaded");
                    if self.out.blocking_send(loaded).is_err() {
                        return; // Nobody listens any more.
                    }
                }
                Err(e) => self.failed(&mut failing, &e),
            }
        }
    }

    /// Logs a failure once per outage, not once per retry.
    fn failed(&self, failing: &mut bool, e: &SourceError) {
        if *failing {
            debug!("{e}; still retrying");
        } else {
            warn!("{e}; keeping the objects loaded last, retrying every {RETRY_EVERY:?}");
        }
        *failing = true;
    }

    /// Whether an event calls for a reload. Opening a file does not (our own reads would otherwise reload
    /// forever); finishing a write does. Watch errors (including a kernel queue overflow) reload to be safe.
    fn triggers(&self, event: &notify::Result<Event>, rewatch: &mut bool) -> bool {
        match event {
            Ok(event) => {
                if let EventKind::Access(kind) = event.kind
                    && kind != AccessKind::Close(AccessMode::Write)
                {
                    return false;
                }
                if event.paths.contains(&self.watched) {
                    *rewatch = true;
                }
                true
            }
            Err(e) => {
                warn!(dir = %self.dir.display(), "manifest folder watch error: {e}; reloading");
                true
            }
        }
    }

    /// Waits until no triggering event came for `debounce` (capped); false when told to stop.
    fn settle(&self, rewatch: &mut bool) -> bool {
        let start = Instant::now();
        let deadline = start + self.debounce * MAX_DEBOUNCE_PERIODS;
        let mut quiet_at = start + self.debounce;
        loop {
            let now = Instant::now();
            let until = quiet_at.min(deadline);
            if now >= until {
                return true;
            }
            match self.events.recv_timeout(until - now) {
                Ok(Msg::Event(event)) => {
                    if self.triggers(&event, rewatch) {
                        quiet_at = Instant::now() + self.debounce;
                    }
                }
                Ok(Msg::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    fn svc(ns: &str, name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
             spec:\n  ports:\n  - port: {port}\n"
        )
    }

    fn refs(l: &Loaded) -> Vec<String> {
        l.objects.iter().map(|o| o.object_ref().to_string()).collect()
    }

    fn rejected(l: &Loaded) -> Vec<String> {
        l.rejected.iter().map(ToString::to_string).collect()
    }

    fn port_of(l: &Loaded, name: &str) -> Option<i32> {
        l.objects.iter().find_map(|o| match o {
            Object::Service(s) if s.metadata.name.as_deref() == Some(name) => {
                Some(s.spec.as_ref()?.ports.as_ref()?.first()?.port)
            }
            _ => None,
        })
    }

    #[test]
    fn multi_document_yaml_json_and_lists() {
        let d = tempfile::tempdir().unwrap();
        let two = format!(
            "# leading comment\n{}---\n---\n# only a comment\n---\n{}",
            svc("a", "one", 80),
            svc("a", "two", 81)
        );
        write(d.path(), "a.yaml", &two);
        write(
            d.path(),
            "b.json",
            r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}}}"#,
        );
        write(
            d.path(),
            "c.yml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: l1}\n- apiVersion: networking.k8s.io/v1\n  kind: IngressClass\n  metadata: {name: mesh}\n",
        );
        write(d.path(), "empty.yaml", "");
        write(d.path(), "empty.json", "\n");
        let l = load_dir(d.path()).unwrap();
        assert_eq!(refs(&l), ["Service a/one", "Service a/two", "Node n1", "Service default/l1", "IngressClass mesh"]);
        assert!(l.rejected.is_empty(), "{:?}", rejected(&l));
        assert_eq!(l.ignored, 0);
        assert_eq!(port_of(&l, "two"), Some(81));
    }

    #[test]
    fn only_manifest_files_directly_in_the_folder() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "web.yaml", &svc("a", "web", 80));
        for skipped in
            [".hidden.yaml", ".#web.yaml", "web.yaml~", ".web.yaml.swp", "web.yaml.swp", "README.md", "x.YAML"]
        {
            write(d.path(), skipped, &svc("a", "skipped", 80));
        }
        fs::create_dir(d.path().join("sub")).unwrap();
        write(&d.path().join("sub"), "deep.yaml", &svc("a", "deep", 80));
        fs::create_dir(d.path().join("dir.yaml")).unwrap();
        let l = load_dir(d.path()).unwrap();
        assert_eq!(refs(&l), ["Service a/web"]);
        assert!(l.rejected.is_empty(), "{:?}", rejected(&l));
    }

    #[cfg(unix)]
    #[test]
    fn mounted_configmap_layout_and_dangling_links() {
        use std::os::unix::fs::symlink;
        // What the kubelet makes of a ConfigMap volume: the files live in a hidden timestamped folder, `..data`
        // links to it, and each visible name links into `..data`.
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("..2024_01_01")).unwrap();
        write(&d.path().join("..2024_01_01"), "web.yaml", &svc("a", "web", 80));
        symlink("..2024_01_01", d.path().join("..data")).unwrap();
        symlink("..data/web.yaml", d.path().join("web.yaml")).unwrap();
        symlink("..data/gone.yaml", d.path().join("gone.yaml")).unwrap();
        let l = load_dir(d.path()).unwrap();
        assert_eq!(refs(&l), ["Service a/web"]);
        let r = rejected(&l);
        assert_eq!(r.len(), 1);
        assert!(r[0].starts_with("gone.yaml: cannot read the file: "), "{r:?}");
        assert_eq!(l.rejected[0].document, 0);
    }

    #[test]
    fn ignored_kinds_are_counted() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg}}\n---\n\
             apiVersion: v1\nkind: Secret\ntype: Opaque\nmetadata: {{name: s}}\n---\n{}",
            svc("a", "web", 80)
        );
        write(d.path(), "app.yaml", &text);
        let l = load_dir(d.path()).unwrap();
        assert_eq!(l.ignored, 3);
        assert_eq!(refs(&l), ["Service a/web"]);
        assert!(l.rejected.is_empty());
    }

    #[test]
    fn a_malformed_document_is_rejected_and_its_neighbours_load() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  ports: eighty\n\
             ---\n{}---\njust a string\n---\napiVersion: v1\nkind: List\nitems:\n- {{kind: Service}}\n",
            svc("shop", "db", 5432),
            svc("shop", "cache", 6379)
        );
        write(d.path(), "shop.yaml", &text);
        let l = load_dir(d.path()).unwrap();
        assert_eq!(refs(&l), ["Service shop/db", "Service shop/cache"]);
        let r = rejected(&l);
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(r[0].starts_with("shop.yaml (document 2): Service shop/web: invalid Service: "), "{r:?}");
        assert_eq!(l.rejected[0].object.as_deref(), Some("Service shop/web"));
        assert!(r[1].starts_with("shop.yaml (document 4): not a Kubernetes object"), "{r:?}");
        assert!(r[2].starts_with("shop.yaml (document 5): List item 1: not a Kubernetes object"), "{r:?}");
    }

    #[test]
    fn a_syntax_error_loses_only_its_file_from_there_on() {
        let d = tempfile::tempdir().unwrap();
        let bad =
            format!("{}---\nkind: Service\n  metadata: [oops\n---\n{}", svc("a", "before", 80), svc("a", "after", 80));
        write(d.path(), "a-bad.yaml", &bad);
        write(d.path(), "b-good.yaml", &svc("a", "good", 80));
        write(d.path(), "c-bad.json", "{\"apiVersion\": \"v1\",");
        write(d.path(), "d-good.json", r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}}"#);
        let l = load_dir(d.path()).unwrap();
        assert_eq!(refs(&l), ["Service a/before", "Service a/good", "Service default/j"]);
        let r = rejected(&l);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].starts_with("a-bad.yaml (document 2): invalid YAML: "), "{r:?}");
        assert!(r[0].ends_with("(the rest of the file is skipped)"), "{r:?}");
        assert!(r[1].starts_with("c-bad.json (document 1): invalid JSON: "), "{r:?}");
    }

    #[test]
    fn the_first_definition_wins() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.yaml", &format!("{}---\n{}", svc("a", "other", 1), svc("a", "web", 80)));
        write(d.path(), "b.yaml", &svc("a", "web", 81));
        let l = load_dir(d.path()).unwrap();
        assert_eq!(refs(&l), ["Service a/other", "Service a/web"]);
        assert_eq!(port_of(&l, "web"), Some(80));
        assert_eq!(
            rejected(&l),
            [
                "b.yaml (document 1): Service a/web: defined again; the first definition, in a.yaml (document 2), is kept"
            ]
        );
    }

    #[test]
    fn an_unreadable_folder_is_the_only_error() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("missing");
        let e = load_dir(&missing).unwrap_err();
        assert!(matches!(e, SourceError::ReadDir { .. }));
        assert!(e.to_string().contains("missing"), "{e}");
        write(d.path(), "file.yaml", "");
        assert!(load_dir(&d.path().join("file.yaml")).is_err());
        assert!(matches!(watch(missing, Duration::from_millis(10)), Err(SourceError::ReadDir { .. })));
    }

    /// Receives loads until one satisfies `pred`, for at most ten seconds.
    async fn wait_for(rx: &mut mpsc::Receiver<Loaded>, what: &str, pred: impl Fn(&Loaded) -> bool) -> Loaded {
        let found = async {
            loop {
                let l = rx.recv().await.expect("the watcher stopped");
                if pred(&l) {
                    return l;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), found).await.unwrap_or_else(|_| panic!("no load with {what}"))
    }

    #[tokio::test]
    async fn the_watcher_reloads_after_writes_renames_and_deletes() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "web.yaml", &svc("a", "web", 80));
        let (mut rx, handle) = watch(d.path().to_owned(), Duration::from_millis(50)).unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(port_of(&first, "web"), Some(80));

        // In-place modification.
        write(d.path(), "web.yaml", &svc("a", "web", 81));
        wait_for(&mut rx, "port 81", |l| port_of(l, "web") == Some(81)).await;

        // An editor's save: write a hidden temporary file, rename it over the original.
        write(d.path(), ".web.yaml.tmp", &svc("a", "web", 82));
        fs::rename(d.path().join(".web.yaml.tmp"), d.path().join("web.yaml")).unwrap();
        wait_for(&mut rx, "port 82", |l| port_of(l, "web") == Some(82)).await;

        // A new file, then a broken edit, then a deletion.
        write(d.path(), "db.yaml", &svc("a", "db", 5432));
        wait_for(&mut rx, "db", |l| port_of(l, "db").is_some()).await;
        write(d.path(), "db.yaml", "kind: [");
        let l = wait_for(&mut rx, "a rejection", |l| !l.rejected.is_empty()).await;
        assert_eq!(refs(&l), ["Service a/web"]);
        fs::remove_file(d.path().join("db.yaml")).unwrap();
        wait_for(&mut rx, "no rejection", |l| l.rejected.is_empty() && refs(l) == ["Service a/web"]).await;

        // Our own reads must not trigger reloads: with nothing changing, nothing arrives.
        let quiet = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await;
        assert!(quiet.is_err(), "reloaded without a change: {quiet:?}");

        // Dropping the handle stops the watcher and closes the channel.
        drop(handle);
        let closed = tokio::time::timeout(Duration::from_secs(10), async { while rx.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "the channel did not close after the handle was dropped");
    }

    #[tokio::test]
    async fn the_watcher_survives_the_folder_being_replaced() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("manifests");
        fs::create_dir(&dir).unwrap();
        write(&dir, "web.yaml", &svc("a", "web", 80));
        let (mut rx, _handle) = watch(dir.clone(), Duration::from_millis(20)).unwrap();
        assert_eq!(refs(&rx.recv().await.unwrap()), ["Service a/web"]);
        fs::remove_dir_all(&dir).unwrap();
        // While the folder is gone nothing is sent (the last load stays in force, not an empty one)...
        let gone = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(gone.is_err(), "sent a load while the folder was gone: {gone:?}");
        // ...and once it is back (a new directory: the old watch died with the old one), it is reloaded.
        fs::create_dir(&dir).unwrap();
        write(&dir, "db.yaml", &svc("a", "db", 5432));
        wait_for(&mut rx, "the new folder", |l| refs(l) == ["Service a/db"]).await;
        write(&dir, "db.yaml", &svc("a", "db", 5433));
        wait_for(&mut rx, "the edit in the new folder", |l| port_of(l, "db") == Some(5433)).await;
    }
}
