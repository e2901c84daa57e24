//! The dashboard's HTML, charts included as inline SVG, from a [`View`]. Every piece of text
//! that comes from the job or its workers goes through [`escape`]; the page carries no inline
//! script or style (its Content-Security-Policy forbids them), only classes that
//! `assets/dashboard.css` colours.

use std::fmt::Write as _;
use std::time::Duration;

use dapt_proto::logging::{clock, significant};

use super::{Point, View};
use crate::progress::thousands;

/// `s` with the five characters that matter to HTML (in text and in quoted attributes)
/// replaced by entities.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The whole page: the panels as of `view`, the stylesheet and the script that keeps them
/// live.
pub fn render_page(view: &View) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>dapt · {job}</title>\
         <link rel=\"stylesheet\" href=\"dashboard.css\">\
         <script src=\"dashboard.js\" defer></script></head>\
         <body data-polls=\"0\"><header><h1>dapt · {job}</h1>\
         <span id=\"live\" class=\"live\">live</span></header>\
         <main id=\"panels\">{panels}</main>\
         <footer>The same figures as JSON: <a href=\"api/dashboard\">api/dashboard</a> · \
         Prometheus: <a href=\"metrics\">metrics</a></footer></body></html>\n",
        job = escape(&view.job),
        panels = render_panels(view),
    )
}

/// The page's live part (what `/dashboard/panels` serves and the script swaps in).
pub fn render_panels(v: &View) -> String {
    let mut o = String::new();
    summary(&mut o, v);
    o.push_str("<section class=\"charts\">");
    let s = &v.series;
    let x_max = v.tokens_trained as f64;
    o.push_str(&chart(&Chart {
        x_max,
        id: "loss",
        title: "training loss",
        lines: vec![Line {
            name: "loss",
            points: &s.loss,
        }],
        refs: Vec::new(),
    }));
    o.push_str(&chart(&Chart {
        x_max,
        id: "learning-rate",
        title: "learning rate",
        lines: vec![Line {
            name: "learning_rate",
            points: &s.learning_rate,
        }],
        refs: Vec::new(),
    }));
    o.push_str(&chart(&Chart {
        x_max,
        id: "throughput",
        title: "tokens/s (training time of each step)",
        lines: vec![Line {
            name: "tokens_per_s",
            points: &s.tokens_per_s,
        }],
        refs: Vec::new(),
    }));
    if !s.mfu.is_empty() {
        let percent: Vec<Point> = s.mfu.iter().map(|p| p.scaled(100.0)).collect();
        o.push_str(&chart(&Chart {
            x_max,
            id: "mfu",
            title: "MFU, % of the devices' dense bf16 peak",
            lines: vec![Line {
                name: "mfu",
                points: &percent,
            }],
            refs: Vec::new(),
        }));
    }
    o.push_str(&chart(&Chart {
        x_max,
        id: "grad-norm",
        title: "gradient norm (before clipping)",
        lines: vec![Line {
            name: "grad_norm",
            points: &s.grad_norm,
        }],
        refs: Vec::new(),
    }));
    if !v.perplexity.is_empty() {
        o.push_str(&chart(&Chart {
            x_max,
            id: "perplexity",
            title: "held-out perplexity (dashed: first evaluation)",
            lines: v
                .perplexity
                .iter()
                .map(|p| Line {
                    name: &p.source,
                    points: &p.points,
                })
                .collect(),
            refs: v
                .perplexity
                .iter()
                .map(|p| {
                    (
                        format!("{} step {}", p.source, p.base.step),
                        p.base.perplexity,
                    )
                })
                .collect(),
        }));
    }
    o.push_str("</section>");
    perplexity_table(&mut o, v);
    timeline(&mut o, v);
    checkpoints(&mut o, v);
    if let Some(guard) = &v.guard {
        o.push_str("<section id=\"guard\"><h2>forgetting guard</h2>");
        json_block(&mut o, guard);
        o.push_str("</section>");
    }
    if let Some(stalls) = &v.stalls {
        let _ = write!(
            o,
            "<section id=\"stalls\"><h2>stalled steps ({})</h2>",
            stalls.total
        );
        json_block(&mut o, &serde_json::Value::Array(stalls.items.clone()));
        o.push_str("</section>");
    }
    o
}

fn summary(o: &mut String, v: &View) {
    let done = if v.total_steps == 0 {
        0.0
    } else {
        v.step as f64 / v.total_steps as f64
    };
    let _ = write!(
        o,
        "<section id=\"summary\"><div class=\"phase phase-{phase}\" data-phase=\"{phase}\">{phase}</div>\
         <div class=\"progress\"><svg viewBox=\"0 0 100 4\" preserveAspectRatio=\"none\" \
         role=\"img\" aria-label=\"{pct:.0}% done\"><rect class=\"track\" width=\"100\" height=\"4\"/>\
         <rect class=\"done\" width=\"{w:.2}\" height=\"4\"/></svg></div><dl class=\"figures\">",
        phase = escape(&v.phase),
        pct = done * 100.0,
        w = (done * 100.0).clamp(0.0, 100.0),
    );
    let mut fig = |name: &str, value: String| {
        let _ = write!(o, "<div><dt>{name}</dt><dd>{value}</dd></div>");
    };
    fig("step", format!("{} / {}", v.step, v.total_steps));
    fig(
        "tokens trained",
        format!(
            "{} / {}",
            thousands(v.tokens_trained),
            thousands(v.total_tokens)
        ),
    );
    fig("elapsed", clock(Duration::from_secs_f64(v.elapsed_s)));
    if let Some(l) = &v.latest {
        if !matches!(v.phase.as_str(), "completed" | "failed" | "stopped") {
            fig("ETA", clock(Duration::from_secs_f64(l.eta_s.max(0.0))));
        }
        fig("loss", significant(l.loss, 4));
        fig(
            "tokens/s",
            format!(
                "{} (ema {})",
                thousands(l.tokens_per_s.round() as u64),
                thousands(l.tokens_per_s_ema.round() as u64)
            ),
        );
        if let Some(mfu) = l.mfu {
            fig("MFU", format!("{:.1}%", mfu * 100.0));
        }
        fig("world", l.world.to_string());
    }
    fig("generation", v.generation.to_string());
    fig(
        "committed",
        if v.checkpoints.total == 0 && v.committed_step == 0 {
            "none yet".to_string()
        } else {
            format!("step {}", v.committed_step)
        },
    );
    o.push_str("</dl>");
    if let Some(reason) = &v.reason {
        let _ = write!(o, "<p class=\"reason\">{}</p>", escape(reason));
    }
    o.push_str("<ul class=\"members\">");
    for m in &v.members {
        let rank = m
            .rank
            .map_or("standby".to_string(), |r| format!("rank {r}"));
        let devices = if m.devices.is_empty() {
            String::new()
        } else {
            format!(" · {}", escape(&m.devices.join(", ")))
        };
        let _ = write!(
            o,
            "<li data-worker=\"{w}\"><b>{w}</b> {rank}{devices}</li>",
            w = escape(&m.worker)
        );
    }
    o.push_str("</ul></section>");
}

fn perplexity_table(o: &mut String, v: &View) {
    if v.perplexity.is_empty() {
        return;
    }
    o.push_str(
        "<section id=\"heldout\"><table><thead><tr><th>source</th><th>first evaluation</th>\
         <th>latest</th><th>change</th></tr></thead><tbody>",
    );
    for p in &v.perplexity {
        let change = if p.latest.step == p.base.step {
            "–".to_string()
        } else {
            format!("{:+.1}%", p.change_pct)
        };
        let class = if p.change_pct > 0.0 { "up" } else { "down" };
        let _ = write!(
            o,
            "<tr data-source=\"{s}\"><td>{s}</td><td>{b} (step {bs})</td><td>{l} (step {ls})</td>\
             <td class=\"{class}\">{change}</td></tr>",
            s = escape(&p.source),
            b = significant(p.base.perplexity, 4),
            bs = p.base.step,
            l = significant(p.latest.perplexity, 4),
            ls = p.latest.step,
        );
    }
    o.push_str("</tbody></table></section>");
}

fn checkpoints(o: &mut String, v: &View) {
    let c = &v.checkpoints;
    let _ = write!(
        o,
        "<section id=\"checkpoints\"><h2>committed checkpoints ({})</h2>",
        c.total
    );
    if c.items.is_empty() {
        o.push_str("<p class=\"empty\">none yet</p></section>");
        return;
    }
    o.push_str(
        "<table><thead><tr><th>step</th><th>tokens</th><th>at</th><th>directory</th>\
         <th>weights xxh3</th></tr></thead><tbody>",
    );
    for k in c.items.iter().rev() {
        let _ = write!(
            o,
            "<tr data-step=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            k.step,
            k.step,
            thousands(k.tokens),
            clock(Duration::from_secs_f64(k.at_s)),
            escape(&k.dir),
            escape(&k.weights_xxh3),
        );
    }
    o.push_str("</tbody></table></section>");
}

/// The generations, recoveries, lost workers and refusals against time since the dashboard
/// started, then the recoveries phase by phase and the refusals as tables.
fn timeline(o: &mut String, v: &View) {
    const W: f64 = 960.0;
    const LEFT: f64 = 96.0;
    const RIGHT: f64 = 12.0;
    const ROW: f64 = 26.0;
    let end = v
        .generations
        .items
        .iter()
        .filter_map(|g| g.until_s)
        .fold(v.elapsed_s, f64::max)
        .max(1.0);
    let x = |t: f64| LEFT + (t / end).clamp(0.0, 1.0) * (W - LEFT - RIGHT);
    let h = 3.0 * ROW + 30.0;
    let _ = write!(
        o,
        "<section id=\"timeline\"><h2>generations ({}), recoveries ({}), workers lost ({}), \
         refusals ({})</h2><svg class=\"timeline\" viewBox=\"0 0 {W} {h}\" role=\"img\" \
         aria-label=\"generations over time\">",
        v.generations.total, v.recoveries.total, v.lost.total, v.refusals.total
    );
    for (i, label) in ["generations", "recoveries", "lost, refused"]
        .iter()
        .enumerate()
    {
        let _ = write!(
            o,
            "<text class=\"row-label\" x=\"4\" y=\"{:.1}\">{label}</text>",
            ROW * i as f64 + ROW * 0.65
        );
    }
    for (i, g) in v.generations.items.iter().enumerate() {
        let (x0, x1) = (x(g.at_s), x(g.until_s.unwrap_or(v.elapsed_s)));
        let ranks = if g.ranks.is_empty() {
            "re-attached".to_string()
        } else {
            g.ranks.join(", ")
        };
        let _ = write!(
            o,
            "<g class=\"generation g{alt}\" data-generation=\"{number}\" data-world=\"{world}\">\
             <rect x=\"{x0:.1}\" y=\"2\" width=\"{w:.1}\" height=\"{rh:.1}\" rx=\"3\"/>\
             <text x=\"{tx:.1}\" y=\"{ty:.1}\">gen {number} · world {world}</text>\
             <title>generation {number}: world {world} ({ranks}) from step {resume} at {at}</title></g>",
            alt = i % 2,
            number = g.generation,
            world = g.world,
            w = (x1 - x0).max(1.0),
            rh = ROW - 4.0,
            tx = x0 + 4.0,
            ty = ROW * 0.65,
            ranks = escape(&ranks),
            resume = g.resume_step,
            at = clock(Duration::from_secs_f64(g.at_s)),
        );
    }
    for r in &v.recoveries.items {
        let last = r.phases.last().map_or(r.detected_at_s, |p| p.at_s);
        let open = r.phases.last().is_none_or(|p| p.phase != "resumed");
        let x1 = if open { x(v.elapsed_s) } else { x(last) };
        let x0 = x(r.detected_at_s);
        let _ = write!(
            o,
            "<g class=\"recovery\" data-generation=\"{}\"><rect x=\"{x0:.1}\" y=\"{:.1}\" \
             width=\"{:.1}\" height=\"{:.1}\"/><title>{}</title>",
            r.generation,
            ROW + 2.0,
            (x1 - x0).max(2.0),
            ROW - 4.0,
            escape(&r.reason)
        );
        for p in &r.phases {
            let _ = write!(
                o,
                "<line class=\"phase\" data-phase=\"{ph}\" x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{:.1}\" \
                 y2=\"{:.1}\"><title>{ph} after {ms} ms</title></line>",
                ROW,
                2.0 * ROW,
                ph = escape(&p.phase),
                px = x(p.at_s),
                ms = p.since_detected_ms,
            );
        }
        o.push_str("</g>");
    }
    let mid = 2.0 * ROW + ROW / 2.0;
    for l in &v.lost.items {
        let px = x(l.at_s);
        let _ = write!(
            o,
            "<g class=\"lost\" data-worker=\"{w}\"><path d=\"M{:.1} {:.1}l10 10m0 -10l-10 10\"/>\
             <title>{w} lost: {r}</title></g>",
            px - 5.0,
            mid - 5.0,
            w = escape(&l.worker),
            r = escape(&l.reason)
        );
    }
    for r in &v.refusals.items {
        let px = x(r.at_s);
        let _ = write!(
            o,
            "<g class=\"refusal\" data-code=\"{c}\"><path d=\"M{px:.1} {:.1}l6 10h-12z\"/>\
             <title>{w} refused ({c}): {m}</title></g>",
            mid - 5.0,
            c = escape(&r.code),
            w = escape(&r.worker),
            m = escape(&r.message)
        );
    }
    // The time axis.
    let axis_y = 3.0 * ROW + 4.0;
    let _ = write!(
        o,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{axis_y}\" y2=\"{axis_y}\"/>",
        W - RIGHT
    );
    for t in ticks(0.0, end, 6) {
        let _ = write!(
            o,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x(t),
            axis_y + 16.0,
            clock(Duration::from_secs_f64(t.max(0.0)))
        );
    }
    o.push_str("</svg>");
    if !v.recoveries.items.is_empty() {
        o.push_str(
            "<table class=\"recoveries\"><thead><tr><th>generation</th><th>detected at</th>\
             <th>phases (since detection)</th><th>reason</th></tr></thead><tbody>",
        );
        for r in v.recoveries.items.iter().rev() {
            let phases: Vec<String> = r
                .phases
                .iter()
                .map(|p| {
                    format!(
                        "<span data-phase=\"{0}\">{0} {1}</span>",
                        escape(&p.phase),
                        crate::control::fmt_duration(Duration::from_millis(p.since_detected_ms))
                    )
                })
                .collect();
            let cause = r
                .cause
                .as_ref()
                .map(|c| format!("<br>cause: {}", escape(c)))
                .unwrap_or_default();
            let _ = write!(
                o,
                "<tr data-generation=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}{cause}</td></tr>",
                r.generation,
                r.generation,
                clock(Duration::from_secs_f64(r.detected_at_s.max(0.0))),
                phases.join(" → "),
                escape(&r.reason),
            );
        }
        o.push_str("</tbody></table>");
    }
    if !v.refusals.items.is_empty() {
        o.push_str(
            "<table class=\"refusals\"><thead><tr><th>at</th><th>worker</th><th>code</th>\
             <th>message</th></tr></thead><tbody>",
        );
        for r in v.refusals.items.iter().rev() {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                clock(Duration::from_secs_f64(r.at_s)),
                escape(&r.worker),
                escape(&r.code),
                escape(&r.message)
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</section>");
}

/// One line of a chart: a named series.
struct Line<'a> {
    name: &'a str,
    points: &'a [Point],
}

/// A chart of series against tokens trained, from 0 to at least `x_max` (every chart of the
/// page shares its x axis), with dashed reference lines (label, y).
struct Chart<'a> {
    x_max: f64,
    id: &'a str,
    title: &'a str,
    lines: Vec<Line<'a>>,
    refs: Vec<(String, f64)>,
}

/// A chart as an SVG figure. Each line is a `<polyline data-series=NAME data-points=N>`; a
/// line of merged points gets a band from their minimum to their maximum; a short line gets a
/// dot per point with its value as a tooltip.
fn chart(c: &Chart) -> String {
    const W: f64 = 480.0;
    const H: f64 = 210.0;
    const LEFT: f64 = 56.0;
    const RIGHT: f64 = 12.0;
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 30.0;
    let mut o = format!(
        "<figure class=\"chart\" id=\"chart-{}\"><figcaption>{}</figcaption>",
        c.id,
        escape(c.title)
    );
    let all = || c.lines.iter().flat_map(|l| l.points.iter());
    if all().next().is_none() {
        o.push_str("<p class=\"empty\">no steps yet</p></figure>");
        return o;
    }
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in all() {
        x0 = x0.min(p.x);
        x1 = x1.max(p.x);
        y0 = y0.min(p.min);
        y1 = y1.max(p.max);
    }
    for (_, y) in &c.refs {
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    (x0, x1) = (x0.min(0.0), x1.max(c.x_max));
    if x1 - x0 <= 0.0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 - y0 > 0.0 {
        (y1 - y0) * 0.06
    } else {
        y1.abs().max(1e-12) * 0.1
    };
    (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let sy = |y: f64| TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM);
    let _ = write!(
        o,
        "<svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{} against tokens trained\">",
        escape(c.title)
    );
    for t in ticks(y0, y1, 5) {
        let y = sy(t);
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 4.0,
            y + 4.0,
            short(t)
        );
    }
    for t in ticks(x0, x1, 5) {
        let _ = write!(
            o,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            sx(t),
            H - BOTTOM + 16.0,
            short(t)
        );
    }
    let _ = write!(
        o,
        "<text class=\"axis-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">tokens trained</text>",
        W - RIGHT,
        H - 2.0
    );
    for (i, (label, y)) in c.refs.iter().enumerate() {
        let py = sy(*y);
        let _ = write!(
            o,
            "<line class=\"ref c{i}\" data-ref=\"{l}\" data-value=\"{y}\" x1=\"{LEFT}\" x2=\"{:.1}\" \
             y1=\"{py:.1}\" y2=\"{py:.1}\"><title>{l}: {v}</title></line>",
            W - RIGHT,
            l = escape(label),
            v = significant(*y, 4),
        );
    }
    for (i, line) in c.lines.iter().enumerate() {
        if line.points.iter().any(|p| p.n > 1) {
            let upper = line.points.iter().map(|p| (sx(p.x), sy(p.max)));
            let lower = line.points.iter().rev().map(|p| (sx(p.x), sy(p.min)));
            let band: Vec<String> = upper
                .chain(lower)
                .map(|(x, y)| format!("{x:.1},{y:.1}"))
                .collect();
            let _ = write!(
                o,
                "<polygon class=\"band c{i}\" points=\"{}\"/>",
                band.join(" ")
            );
        }
        let points: Vec<String> = line
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y)))
            .collect();
        let _ = write!(
            o,
            "<polyline class=\"line c{i}\" data-series=\"{}\" data-points=\"{}\" points=\"{}\"/>",
            escape(line.name),
            line.points.len(),
            points.join(" ")
        );
        if line.points.len() <= 64 {
            for p in line.points {
                let _ = write!(
                    o,
                    "<circle class=\"dot c{i}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\"><title>{}: {} at {} tokens</title></circle>",
                    sx(p.x),
                    sy(p.y),
                    escape(line.name),
                    significant(p.y, 4),
                    thousands(p.x.round() as u64)
                );
            }
        }
    }
    o.push_str("</svg>");
    if c.lines.len() > 1 || !c.refs.is_empty() {
        o.push_str("<div class=\"legend\">");
        for (i, line) in c.lines.iter().enumerate() {
            let _ = write!(o, "<span class=\"key c{i}\">{}</span>", escape(line.name));
        }
        o.push_str("</div>");
    }
    o.push_str("</figure>");
    o
}

/// About `target` round tick values (1, 2 or 5 times a power of ten apart) within [lo, hi].
pub(super) fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return Vec::new();
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    // Multiples of the step, each computed afresh (a running sum drifts: 0.30000000000000004).
    let first = (lo / step - 1e-9).ceil() as i64;
    (first..)
        .map(|k| k as f64 * step)
        .map(|t| if step >= 1.0 { t } else { round_to(t, step) })
        .take_while(|t| *t <= hi + step * 1e-9)
        .take(2 * target + 2)
        .collect()
}

/// `t` rounded to the decimals that `step` (a power of ten times 1, 2 or 5, below 1) has.
fn round_to(t: f64, step: f64) -> f64 {
    let decimals = (-step.log10().floor()) as i32 + 1;
    let scale = 10f64.powi(decimals);
    (t * scale).round() / scale
}

/// A tick label: `1.2k`, `3.5M`, `0.25`, `3.0e-4`.
pub(super) fn short(x: f64) -> String {
    let a = x.abs();
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if a >= 1e9 {
        format!("{}G", trim(format!("{:.2}", x / 1e9)))
    } else if a >= 1e6 {
        format!("{}M", trim(format!("{:.2}", x / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(format!("{:.1}", x / 1e3)))
    } else if a == 0.0 {
        "0".into()
    } else if a >= 1e-3 {
        trim(significant(x, 3))
    } else {
        format!("{x:.1e}")
    }
}

/// Any JSON as HTML: an object as a list of its scalar fields, then its lists of objects and
/// its objects as tables and nested blocks; a list of objects as a table whose columns are
/// their keys.
fn json_block(o: &mut String, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            o.push_str("<dl class=\"json\">");
            for (k, v) in map {
                if !(v.is_object() || v.is_array()) {
                    let _ = write!(
                        o,
                        "<div><dt>{}</dt><dd>{}</dd></div>",
                        escape(k),
                        escape(&scalar(v))
                    );
                }
            }
            o.push_str("</dl>");
            for (k, v) in map {
                if v.is_object() || v.is_array() {
                    let _ = write!(o, "<h3>{}</h3>", escape(k));
                    json_block(o, v);
                }
            }
        }
        Value::Array(items) => {
            let mut columns: Vec<&str> = Vec::new();
            for item in items {
                if let Value::Object(m) = item {
                    for k in m.keys() {
                        if !columns.contains(&k.as_str()) {
                            columns.push(k);
                        }
                    }
                }
            }
            o.push_str("<table class=\"json\">");
            if !columns.is_empty() {
                o.push_str("<thead><tr>");
                for c in &columns {
                    let _ = write!(o, "<th>{}</th>", escape(c));
                }
                o.push_str("</tr></thead>");
            }
            o.push_str("<tbody>");
            for item in items {
                o.push_str("<tr>");
                match item {
                    Value::Object(m) => {
                        for c in &columns {
                            let cell = m.get(*c).map(scalar).unwrap_or_default();
                            let _ = write!(o, "<td>{}</td>", escape(&cell));
                        }
                    }
                    other => {
                        let _ = write!(o, "<td>{}</td>", escape(&scalar(other)));
                    }
                }
                o.push_str("</tr>");
            }
            o.push_str("</tbody></table>");
        }
        other => {
            let _ = write!(o, "<p>{}</p>", escape(&scalar(other)));
        }
    }
}

/// A JSON value as a table cell: strings bare, numbers with 4 significant digits, the rest as
/// compact JSON.
fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| significant(f, 4)),
        serde_json::Value::Null => "–".into(),
        other => other.to_string(),
    }
}
