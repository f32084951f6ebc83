//! Drawing `top`'s screen from its window of readings: a pure function of the state,
//! so the tests render it into ratatui's `TestBackend` exactly as a terminal shows it.
//!
//! At 80×24 every part fits: three summary lines, the backends (one row each, and a
//! line for each unhealthy one saying why), rejections and the router's own figures,
//! and a status line. A larger terminal widens the backend column and shows more rows.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

use crate::control::top::fetch::Server;
use crate::control::top::window::{Window, SPAN};
use crate::control::top::{Status, Top};

const TTFT: &str = "vllm_router_time_to_first_token_seconds";
const REQUESTS: &str = "vllm_router_requests_total";
const TOKENS: &str = "vllm_router_completion_tokens_total";
/// Cells of the in-flight bar, before its figures.
const BAR: usize = 8;

pub fn draw(frame: &mut Frame, top: &Top) {
    let [head, backends, bottom, status] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(5),
        Constraint::Length(7),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(summary(top)), head);
    draw_backends(frame, backends, &top.window);
    let [rejections, router] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    draw_rejections(frame, rejections, &top.window);
    draw_router(frame, router, &top.window);
    frame.render_widget(Paragraph::new(status_line(top)), status);
}

fn summary(top: &Top) -> Vec<Line<'static>> {
    let w = &top.window;
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut title = vec![
        Span::styled(" vllm-router top ", bold.fg(Color::Cyan)),
        Span::raw(top.source.base.clone()),
    ];
    let Some(latest) = w.latest() else {
        return vec![
            Line::from(title),
            Line::from(" waiting for the first reading"),
        ];
    };
    let h = &latest.health;
    title.push(Span::raw(format!(
        "  v{}  up {}",
        h.version,
        uptime(h.uptime_seconds)
    )));
    if let Status::Down { .. } = top.status {
        let age = latest.at.elapsed().as_secs();
        title.push(Span::styled(
            format!("  as of {age} s ago"),
            Style::default().fg(Color::Red),
        ));
    }
    let healthy = h.servers.iter().filter(|s| s.healthy).count();
    let health_style = if healthy == h.servers.len() {
        Style::default().fg(Color::Green)
    } else if healthy > 0 {
        Style::default().fg(Color::Yellow)
    } else {
        Style::default().fg(Color::Red)
    };
    let in_flight: u32 = h.servers.iter().map(|s| s.in_flight).sum();
    let capacity: u32 = h.servers.iter().map(|s| s.capacity).sum();
    let queue = w.gauge("vllm_router_queue_length", &[]);
    let queue_cap = w.gauge("vllm_router_queue_capacity", &[]);
    let line1 = Line::from(vec![
        Span::styled(
            format!(" {healthy}/{} backends healthy", h.servers.len()),
            health_style,
        ),
        Span::raw(format!(
            "  {} req/s  {} tok/s  TTFT p50 {} p99 {}",
            rate(w.rate(REQUESTS, &[])),
            rate(w.rate(TOKENS, &[])),
            secs(w.quantile(0.5, TTFT, &[])),
            secs(w.quantile(0.99, TTFT, &[])),
        )),
    ]);
    let line2 = Line::from(format!(
        " in flight {in_flight}/{capacity}  queue {}/{}  clients {}  retries {}/s",
        count(queue),
        count(queue_cap),
        count(w.gauge("vllm_router_client_connections", &[])),
        rate(w.rate("vllm_router_retries_total", &[])),
    ));
    vec![Line::from(title), line1, line2]
}

fn draw_backends(frame: &mut Frame, area: Rect, w: &Window) {
    let block = Block::default().borders(Borders::ALL).title(" Backends ");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let servers: &[Server] = w.latest().map_or(&[], |l| &l.health.servers);
    let down: Vec<Line> = servers
        .iter()
        .filter(|s| !s.healthy)
        .map(|s| {
            Line::from(vec![
                Span::styled(" down ", Style::default().fg(Color::Red)),
                Span::raw(format!(
                    "{}: {}",
                    short(&s.url),
                    s.reason.as_deref().unwrap_or("no reason given")
                )),
            ])
        })
        .collect();
    // The reasons take up to two lines each (wrapped), at most half the block.
    let reasons = (2 * down.len() as u16).min(inner.height / 2);
    let [table_area, reasons_area] =
        Layout::vertical([Constraint::Min(2), Constraint::Length(reasons)]).areas(inner);
    let header = Row::new([
        "backend",
        "state",
        "in flight",
        "run/wait",
        "kv",
        "req/s",
        "TTFT p50/99",
        "tok/s",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = servers.iter().map(|s| backend_row(s, w));
    let widths = [
        Constraint::Min(14),
        Constraint::Length(5),
        Constraint::Length(BAR as u16 + 8),
        Constraint::Length(8),
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(11),
        Constraint::Length(6),
    ];
    frame.render_widget(Table::new(rows, widths).header(header), table_area);
    frame.render_widget(
        Paragraph::new(down).wrap(Wrap { trim: false }),
        reasons_area,
    );
}

fn backend_row<'a>(s: &'a Server, w: &Window) -> Row<'a> {
    let by = [("backend", s.url.as_str())];
    let (state, style) = if s.healthy {
        ("up", Style::default().fg(Color::Green))
    } else {
        ("down", Style::default().fg(Color::Red))
    };
    let ratio = if s.capacity == 0 {
        0.0
    } else {
        f64::from(s.in_flight) / f64::from(s.capacity)
    };
    let filled = ((ratio * BAR as f64).round() as usize).min(BAR);
    let bar = format!(
        "{}{} {}/{}",
        "█".repeat(filled),
        "░".repeat(BAR - filled),
        s.in_flight,
        s.capacity
    );
    let bar_style = Style::default().fg(if ratio >= 0.9 {
        Color::Red
    } else if ratio >= 0.7 {
        Color::Yellow
    } else {
        Color::Green
    });
    // What a backend reported is from its last good scrape: stale once it is down.
    let reported = match (s.running, s.waiting) {
        (Some(r), Some(q)) if s.healthy => format!("{r:.0}/{q:.0}"),
        _ => "-".to_owned(),
    };
    let kv = s
        .kv_cache
        .filter(|_| s.healthy)
        .map_or("-".to_owned(), |k| format!("{:.0}%", k * 100.0));
    let ttft = format!(
        "{}/{}",
        secs(w.quantile(0.5, TTFT, &by)),
        secs(w.quantile(0.99, TTFT, &by))
    );
    Row::new([
        Cell::from(short(&s.url).to_owned()),
        Cell::from(state).style(style),
        Cell::from(bar).style(bar_style),
        Cell::from(reported),
        Cell::from(kv),
        Cell::from(rate(w.rate(REQUESTS, &by))),
        Cell::from(ttft),
        Cell::from(rate(w.rate(TOKENS, &by))),
    ])
}

fn draw_rejections(frame: &mut Frame, area: Rect, w: &Window) {
    let title = format!(" Rejected, last {} s ", span_secs(w));
    let lines: Vec<Line> = w
        .increase_by("vllm_router_rejected_requests_total", "reason")
        .into_iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(reason, n)| Line::from(format!(" {reason:<20} {n:>6.0}")))
        .collect();
    let lines = if lines.is_empty() {
        vec![Line::from(" none")]
    } else {
        lines
    };
    let block = Block::default().borders(Borders::ALL).title(title);
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn draw_router(frame: &mut Frame, area: Rect, w: &Window) {
    let closed: f64 = w
        .increase("vllm_router_client_connections_closed_total", &[])
        .unwrap_or(0.0);
    let by_status = |class: &str| rate(w.rate(REQUESTS, &[("status", class)]));
    let lines = vec![
        Line::from(format!(
            " replies 2xx {}/s 4xx {}/s 5xx {}/s",
            by_status("2xx"),
            by_status("4xx"),
            by_status("5xx")
        )),
        Line::from(format!(
            " prompt {} tok/s  e2e p50 {}",
            rate(w.rate("vllm_router_prompt_tokens_total", &[])),
            secs(w.quantile(0.5, "vllm_router_e2e_request_latency_seconds", &[])),
        )),
        Line::from(format!(
            " queue wait p99 {}",
            secs(w.quantile(0.99, "vllm_router_queue_wait_seconds", &[]))
        )),
        Line::from(format!(
            " connections closed {closed:.0}  reloads {}",
            count(w.gauge("vllm_router_config_reloads_total", &[]))
        )),
    ];
    let block = Block::default().borders(Borders::ALL).title(" Router ");
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

fn status_line(top: &Top) -> Line<'static> {
    match &top.status {
        Status::Up => Line::from(format!(
            " q quit · every 1 s · rates and TTFT over the last {} s",
            span_secs(&top.window)
        ))
        .style(Style::default().fg(Color::DarkGray)),
        Status::Waiting => Line::from(" q quit · connecting…"),
        Status::Down { error, attempts } => Line::from(format!(
            " unreachable: {error} · try {attempts}, again every 1 s"
        ))
        .style(Style::default().fg(Color::Black).bg(Color::Red)),
    }
}

fn span_secs(w: &Window) -> u64 {
    w.span()
        .map_or(0, |s| s.as_secs_f64().round() as u64)
        .min(SPAN.as_secs())
}

/// A backend URL without its scheme: the column is narrow.
fn short(url: &str) -> &str {
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url)
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) if s < 100.0 => format!("{s:.1}s"),
        Some(s) => format!("{s:.0}s"),
    }
}

fn rate(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(r) if r < 100.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

fn count(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |n| format!("{n:.0}"))
}

fn uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_short() {
        assert_eq!(
            [
                secs(Some(0.3104)),
                secs(Some(2.25)),
                secs(Some(300.0)),
                secs(None)
            ],
            ["310ms", "2.2s", "300s", "-"]
        );
        assert_eq!([rate(Some(3.21)), rate(Some(1234.0))], ["3.2", "1234"]);
        assert_eq!(
            [uptime(59), uptime(61), uptime(7300), uptime(90000)],
            ["59s", "1m01s", "2h01m", "1d01h"]
        );
        assert_eq!(short("http://10.0.0.1:8000"), "10.0.0.1:8000");
    }
}
