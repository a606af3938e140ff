//! Headless Chromium driven over the Chrome DevTools Protocol, for black-box tests of the admin
//! page: [`Browser::launch`] starts `chromium --headless` on a throwaway profile with
//! `--remote-debugging-port=0`, reads the DevTools URL from its stderr and connects to it
//! over WebSocket (`tungstenite`). [`Browser::open`] gives a [`Page`] (a tab
//! attached in flat mode) with `eval`, `wait_for`, real mouse clicks and typing.
//!
//! One thread owns the WebSocket: it sends what the test queues and hands every message from
//! Chromium over a channel (reading with a short timeout, so that neither waits on the
//! other); command answers are matched by id, everything else is kept as an event (`Runtime.exceptionThrown`,
//! `Browser.downloadProgress`, …) for the test to inspect.
//!
//! Chromium runs in its own process group; Drop closes it over CDP, then kills that group (by
//! its id) and the crash handlers, which leave the group (setsid) but name the throwaway profile
//! on their command line (`--database=<profile>/…`): nothing outlives the test. (Disabling
//! crashpad with `--disable-crashpad-for-testing` is no option: Chromium 156 then aborts with
//! "FD ownership violation" on the first navigation.)

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::sys::{collect_lines, is_executable, poll_until, which};

const NOT_FOUND: &str = "chromium not found (/usr/bin/chromium or on PATH): install it with `apt-get install -y chromium`";

/// How long one CDP command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the connection's thread waits for a message before it looks for one to send.
const POLL: Duration = Duration::from_millis(5);

/// The Chromium binary; panics with the install command when missing.
pub fn chromium_path() -> PathBuf {
    let default = Path::new("/usr/bin/chromium");
    if is_executable(default) {
        return default.to_path_buf();
    }
    which("chromium")
        .or_else(|| which("chromium-browser"))
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

pub struct Browser {
    child: Child,
    /// The `--user-data-dir` (and a downloads directory), removed on Drop.
    profile: tempfile::TempDir,
    /// Messages for Chromium, sent by the connection's thread; dropped to end it.
    outbox: Option<Sender<String>>,
    inbox: Mutex<Receiver<Value>>,
    events: Mutex<Vec<Value>>,
    next_id: AtomicU64,
    connection: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl Browser {
    /// Starts headless Chromium and connects to its browser-level DevTools endpoint.
    pub fn launch() -> Browser {
        let path = chromium_path();
        let profile = tempfile::tempdir().expect("temp dir for the Chromium profile");
        let mut cmd = Command::new(&path);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--password-store=basic",
            "--use-mock-keychain",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .arg("about:blank")
        // Its caches and crash dumps stay in the throwaway directory too.
        .env("HOME", profile.path())
        .env("XDG_CONFIG_HOME", profile.path().join("config"))
        .env("XDG_CACHE_HOME", profile.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}. {NOT_FOUND}", path.display()));
        let stderr = collect_lines(child.stderr.take().expect("piped stderr"));
        let mut url = None;
        let found = poll_until(Duration::from_secs(60), || {
            url = stderr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lines()
                .find_map(|l| l.split("DevTools listening on ").nth(1))
                .map(|u| u.trim().to_string());
            url.is_some() || matches!(child.try_wait(), Ok(Some(_)))
        });
        let Some(url) = url.filter(|_| found) else {
            let status = child.try_wait().ok().flatten();
            kill_group(&mut child);
            kill_named(profile.path());
            panic!(
                "Chromium did not print its DevTools URL (exit: {status:?}); stderr:\n{}",
                stderr.lock().unwrap_or_else(|e| e.into_inner())
            );
        };
        let socket = match connect(&url) {
            Ok(s) => s,
            Err(e) => {
                kill_group(&mut child);
                kill_named(profile.path());
                panic!("cannot connect to Chromium's DevTools at {url}: {e}");
            }
        };
        let (outbox, to_send) = channel();
        let (received, inbox) = channel();
        let connection = std::thread::spawn(move || serve(socket, to_send, received));
        Browser {
            child,
            profile,
            outbox: Some(outbox),
            inbox: Mutex::new(inbox),
            events: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            connection: Some(connection),
            stderr,
        }
    }

    /// The process group Chromium and its helpers run in (its pid).
    pub fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// The throwaway directory holding the profile (every Chromium process names it on its
    /// command line).
    pub fn profile_dir(&self) -> PathBuf {
        self.profile.path().to_path_buf()
    }

    /// What Chromium wrote on stderr so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A directory inside the profile's temp dir, created empty.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        let d = self.profile.path().join(name);
        std::fs::create_dir_all(&d).expect("create scratch dir");
        d
    }

    /// Sends a command (on `session`, or to the browser) and waits for its answer:
    /// Ok(result) or Err(error object).
    pub fn try_call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = Value::from(s);
        }
        let sent = self.outbox.as_ref().map(|o| o.send(msg.to_string()));
        assert!(
            matches!(sent, Some(Ok(()))),
            "sending {method} to Chromium failed: the DevTools connection is closed; Chromium stderr:\n{}",
            self.stderr()
        );
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let m = self.recv(deadline).unwrap_or_else(|why| {
                panic!(
                    "no answer to {method} ({why}); Chromium stderr:\n{}",
                    self.stderr()
                )
            });
            if m.get("id").and_then(Value::as_u64) == Some(id) {
                return match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m.get("result").cloned().unwrap_or(Value::Null)),
                };
            }
            self.keep(m);
        }
    }

    /// [`Browser::try_call`], panicking on an error answer.
    #[track_caller]
    pub fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(session, method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    fn recv(&self, deadline: Instant) -> Result<Value, &'static str> {
        let inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let left = deadline.saturating_duration_since(Instant::now());
        match inbox.recv_timeout(left) {
            Ok(m) => Ok(m),
            Err(RecvTimeoutError::Timeout) => Err("timed out"),
            Err(RecvTimeoutError::Disconnected) => Err("the DevTools connection closed"),
        }
    }

    fn keep(&self, m: Value) {
        if m.get("method").is_some() {
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m);
        }
    }

    /// Moves every message already received into the event list.
    fn pump(&self) {
        let inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        let drained: Vec<Value> = inbox.try_iter().collect();
        drop(inbox);
        for m in drained {
            self.keep(m);
        }
    }

    /// Every event received so far named `method` (any session).
    pub fn events(&self, method: &str) -> Vec<Value> {
        self.pump();
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e["method"] == method)
            .cloned()
            .collect()
    }

    /// Waits for an event named `method` whose params satisfy `f`; returns its params.
    #[track_caller]
    pub fn wait_event(&self, method: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events(method).into_iter().find(|e| f(&e["params"])) {
                return e["params"].clone();
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for the event {method}");
            }
            if let Ok(m) = self.recv(Instant::now() + Duration::from_millis(50)) {
                self.keep(m);
            }
        }
    }

    /// A new tab attached in flat mode, with the Page, Runtime and Log domains enabled,
    /// navigated to `url` (returns once its load event fired).
    pub fn open(&self, url: &str) -> Page<'_> {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let page = Page {
            browser: self,
            session,
        };
        page.call("Page.enable", json!({}));
        page.call("Runtime.enable", json!({}));
        page.navigate(url);
        page
    }

    /// Lets the browser save downloads into `dir` under their suggested names, with
    /// `Browser.downloadWillBegin` / `Browser.downloadProgress` events.
    pub fn allow_downloads(&self, dir: &Path) {
        self.call(
            None,
            "Browser.setDownloadBehavior",
            json!({"behavior": "allow", "downloadPath": dir.to_str().expect("UTF-8 path"), "eventsEnabled": true}),
        );
    }
}

/// Connects to Chromium's DevTools at `url` (`ws://127.0.0.1:<port>/devtools/browser/<id>`);
/// reads time out after [`POLL`].
fn connect(url: &str) -> Result<tungstenite::WebSocket<TcpStream>, String> {
    let host = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let stream = TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (socket, _) = tungstenite::client(url, stream).map_err(|e| e.to_string())?;
    socket
        .get_ref()
        .set_read_timeout(Some(POLL))
        .map_err(|e| e.to_string())?;
    Ok(socket)
}

/// The connection's thread: sends what arrives on `to_send`, hands every JSON message from
/// Chromium to `received`, and ends when either side is gone (closing the WebSocket if it
/// can). Pings are answered by tungstenite.
fn serve(
    mut socket: tungstenite::WebSocket<TcpStream>,
    to_send: Receiver<String>,
    received: Sender<Value>,
) {
    use tungstenite::{Error, Message};
    loop {
        loop {
            match to_send.try_recv() {
                Ok(text) => {
                    if socket.send(Message::text(text)).is_err() {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = socket.close(None);
                    let _ = socket.flush();
                    return;
                }
            }
        }
        let parsed = match socket.read() {
            Ok(Message::Text(text)) => serde_json::from_str::<Value>(text.as_str()).ok(),
            Ok(Message::Binary(bytes)) => serde_json::from_slice::<Value>(&bytes).ok(),
            Ok(_) => None,
            Err(Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(_) => return,
        };
        if let Some(msg) = parsed {
            if received.send(msg).is_err() {
                return;
            }
        }
    }
}

/// Kills the process group led by `child` (Chromium and every helper it forked), then reaps.
fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) on the process group our own child leads (process_group(0) at spawn).
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Pids of live processes whose command line names `dir` (Chromium's helpers that left the
/// process group: the crashpad handlers).
pub fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle.as_str())
        })
        .collect()
}

/// SIGKILLs (by pid) every process naming `dir`, until none is left (at most 5 s).
fn kill_named(dir: &Path) {
    poll_until(Duration::from_secs(5), || {
        let pids = processes_naming(dir);
        for pid in &pids {
            // SAFETY: kill(2) on a process started for this browser (it names our temp dir).
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        pids.is_empty()
    });
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Ask politely (flushes the profile), then make sure.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if let Some(outbox) = &self.outbox {
                let _ = outbox.send(json!({"id": id, "method": "Browser.close"}).to_string());
            }
            let child = &mut self.child;
            poll_until(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
        }
        // Helpers (zygote, renderers) share the group even after the browser process exits.
        // SAFETY: as in kill_group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        kill_named(self.profile.path());
        // The connection's thread ends once it finds the outbox closed.
        self.outbox = None;
        if let Some(c) = self.connection.take() {
            let _ = c.join();
        }
    }
}

/// One tab, addressed by its flat-mode session id.
pub struct Page<'a> {
    pub browser: &'a Browser,
    pub session: String,
}

impl Page<'_> {
    #[track_caller]
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params)
    }

    pub fn try_call(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.browser.try_call(Some(&self.session), method, params)
    }

    /// Events of this tab named `method`.
    pub fn events(&self, method: &str) -> Vec<Value> {
        self.browser
            .events(method)
            .into_iter()
            .filter(|e| e["sessionId"] == self.session.as_str())
            .collect()
    }

    /// `Page.navigate`, then waits for this tab's next load event.
    #[track_caller]
    pub fn navigate(&self, url: &str) {
        let before = self.events("Page.loadEventFired").len();
        let nav = self.call("Page.navigate", json!({"url": url}));
        if let Some(err) = nav.get("errorText").and_then(Value::as_str) {
            panic!("navigating to {url} failed: {err}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.events("Page.loadEventFired").len() <= before {
            assert!(
                Instant::now() < deadline,
                "{url} did not finish loading within 30 s"
            );
            if let Ok(m) = self
                .browser
                .recv(Instant::now() + Duration::from_millis(50))
            {
                self.browser.keep(m);
            }
        }
    }

    /// Evaluates `expr` (promises awaited) and returns its value by JSON; panics on a thrown
    /// exception, with its description.
    #[track_caller]
    pub fn eval(&self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!(
                "evaluating `{expr}` threw: {}",
                ex["exception"]["description"]
                    .as_str()
                    .unwrap_or(&ex.to_string())
            );
        }
        r["result"].get("value").cloned().unwrap_or(Value::Null)
    }

    /// Polls `expr` until it is truthy (not null, false, 0 or ""); returns that value. On
    /// timeout panics naming `what`, with the page's visible text.
    #[track_caller]
    pub fn wait_for(&self, expr: &str, timeout: Duration, what: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} (`{expr}` = {v}); page text:\n{}",
                    self.text("body")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `textContent` of the first element matching `selector` ("" when none).
    pub fn text(&self, selector: &str) -> String {
        self.eval(&format!(
            "(function(){{var e=document.querySelector({});return e?e.textContent:''}})()",
            Value::from(selector)
        ))
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// The centre of `selector`'s content box (scrolled into view), in CSS pixels.
    #[track_caller]
    pub fn center_of(&self, selector: &str) -> (f64, f64) {
        let doc = self.call("DOM.getDocument", json!({"depth": 0}));
        let root = doc["root"]["nodeId"].as_i64().expect("root nodeId");
        let found = self.call(
            "DOM.querySelector",
            json!({"nodeId": root, "selector": selector}),
        );
        let node = found["nodeId"].as_i64().unwrap_or(0);
        assert!(node != 0, "no element matches {selector}");
        let _ = self.try_call("DOM.scrollIntoViewIfNeeded", json!({"nodeId": node}));
        let model = self.call("DOM.getBoxModel", json!({"nodeId": node}));
        let quad: Vec<f64> = model["model"]["content"]
            .as_array()
            .expect("content quad")
            .iter()
            .map(|v| v.as_f64().expect("coordinate"))
            .collect();
        let x = (quad[0] + quad[2] + quad[4] + quad[6]) / 4.0;
        let y = (quad[1] + quad[3] + quad[5] + quad[7]) / 4.0;
        (x, y)
    }

    /// A real left click (move, press, release) in the middle of `selector`'s box, after
    /// checking that this point hits that element (nothing covers it).
    #[track_caller]
    pub fn click(&self, selector: &str) {
        let (x, y) = self.center_of(selector);
        let hit = self.eval(&format!(
            "(function(){{var e=document.querySelector({sel}),h=document.elementFromPoint({x},{y});\
             return !!e && !!h && (e===h || e.contains(h));}})()",
            sel = Value::from(selector)
        ));
        assert_eq!(
            hit,
            Value::Bool(true),
            "the point ({x}, {y}) does not hit {selector}"
        );
        for (kind, buttons) in [("mouseMoved", 0), ("mousePressed", 1), ("mouseReleased", 0)] {
            let mut ev = json!({"type": kind, "x": x, "y": y, "buttons": buttons});
            if kind != "mouseMoved" {
                ev["button"] = "left".into();
                ev["clickCount"] = 1.into();
            }
            self.call("Input.dispatchMouseEvent", ev);
        }
    }

    /// Clicks `selector` (an input), selects its current text and types `text` over it
    /// (`Input.insertText`: the page sees `input` events as from a keyboard).
    #[track_caller]
    pub fn type_into(&self, selector: &str, text: &str) {
        self.click(selector);
        let focused = self.eval(&format!(
            "(function(){{var e=document.querySelector({});e.select();return document.activeElement===e}})()",
            Value::from(selector)
        ));
        assert_eq!(
            focused,
            Value::Bool(true),
            "{selector} did not take the focus"
        );
        self.call("Input.insertText", json!({"text": text}));
    }

    /// `Runtime.exceptionThrown` events of this tab, as one-line descriptions.
    pub fn exceptions(&self) -> Vec<String> {
        self.events("Runtime.exceptionThrown")
            .iter()
            .map(|e| {
                let d = &e["params"]["exceptionDetails"];
                d["exception"]["description"]
                    .as_str()
                    .or(d["text"].as_str())
                    .unwrap_or("?")
                    .to_string()
            })
            .collect()
    }
}
