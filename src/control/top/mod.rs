//! `vllm-router top`: a live view of a running router in the terminal, refreshed
//! every second from its own endpoints (`/health`, `/metrics`) over plain HTTP.
//!
//! - `fetch`: one reading of the router; `exposition`: the Prometheus text read back;
//! - `window`: the last minute of readings, and the rates and quantiles over it;
//! - `view`: drawing the screen, a pure function of `Top` (ratatui, crossterm backend).
//!
//! It runs on the main thread alone: read, draw, wait for a key until the next second.
//! A router that does not answer leaves the last figures on screen with a line saying
//! so, and is tried again every second; `q` (or Ctrl-C, or Esc) quits with status 0.

pub mod exposition;
pub mod fetch;
pub mod view;
pub mod window;

use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::Frame;

use crate::control::top::fetch::Source;
use crate::control::top::window::Window;
use crate::request::auth::Secret;

/// How often the router is read.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Whether the last reading came.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Waiting,
    Up,
    /// The last `attempts` readings failed; `error` says how the last did.
    Down {
        error: String,
        attempts: u32,
    },
}

/// The state of the view: where it reads, what it read.
pub struct Top {
    pub source: Source,
    pub window: Window,
    pub status: Status,
}

impl Top {
    pub fn new(url: &str, key: Option<Secret>) -> Top {
        Top {
            source: Source::new(url, key),
            window: Window::default(),
            status: Status::Waiting,
        }
    }

    /// Takes one reading.
    pub fn refresh(&mut self) {
        match self.source.read() {
            Ok(reading) => {
                self.window.push(reading);
                self.status = Status::Up;
            }
            Err(error) => {
                let attempts = match &self.status {
                    Status::Down { attempts, .. } => attempts + 1,
                    _ => 1,
                };
                self.status = Status::Down { error, attempts };
            }
        }
    }

    pub fn draw(&self, frame: &mut Frame) {
        view::draw(frame, self);
    }
}

/// Runs the view until the operator quits.
pub fn run(url: &str, key: Option<Secret>) -> ExitCode {
    let mut top = Top::new(url, key);
    let mut terminal = match ratatui::try_init() {
        Ok(terminal) => terminal,
        Err(e) => {
            ratatui::restore();
            eprintln!("vllm-router top: cannot use this terminal ({e}); run it in an interactive terminal");
            return ExitCode::from(1);
        }
    };
    let result = watch(&mut top, &mut terminal);
    ratatui::restore();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vllm-router top: the terminal failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn watch(top: &mut Top, terminal: &mut ratatui::DefaultTerminal) -> io::Result<()> {
    let mut next = Instant::now();
    loop {
        if Instant::now() >= next {
            top.refresh();
            next = Instant::now() + REFRESH;
        }
        terminal.draw(|frame| top.draw(frame))?;
        // Keys (and resizes, which redraw) until the next reading is due.
        while event::poll(next.saturating_duration_since(Instant::now()))? {
            match event::read()? {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                        && key.code == KeyCode::Char('c');
                    if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                Event::Resize(..) => break,
                _ => {}
            }
        }
    }
}
