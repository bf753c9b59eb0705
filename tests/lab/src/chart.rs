//! The lab's PNG chart, drawn with plotters' bitmap backend. Text uses the
//! public-domain 8×8 glyphs of `font8x8`, so no system font is needed.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

/// A time interval of one kind on one row.
pub struct Span {
    pub start: f64,
    pub end: f64,
    pub color: RGBColor,
}

pub struct Row {
    pub label: String,
    pub spans: Vec<Span>,
    /// A tick: the ETA shown at upload (predicted completion), seconds.
    pub marker: Option<f64>,
}

pub struct Chart {
    pub title: String,
    /// Phase band: (start, end, phase name).
    pub phases: Vec<(f64, f64, String)>,
    pub rows: Vec<Row>,
    /// (label, seconds) bars comparing wall times.
    pub bars: Vec<(String, f64)>,
}

pub const WAIT: RGBColor = RGBColor(200, 200, 200);
pub const STT: RGBColor = RGBColor(66, 133, 244);
pub const EVAL: RGBColor = RGBColor(244, 160, 0);
pub const SCORE: RGBColor = RGBColor(15, 157, 88);
pub const FAILED: RGBColor = RGBColor(219, 68, 55);

fn phase_color(p: &str) -> RGBColor {
    match p {
        "stt" => STT,
        "evaluation" => EVAL,
        "pipelined" => RGBColor(150, 110, 200),
        _ => RGBColor(235, 235, 235),
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn text(area: &Area, x: i32, y: i32, s: &str, color: &RGBColor) {
    for (i, ch) in s.chars().enumerate() {
        let c = ch as usize;
        let glyph = if c < 128 {
            font8x8::legacy::BASIC_LEGACY[c]
        } else {
            font8x8::legacy::BASIC_LEGACY[b'?' as usize]
        };
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8 {
                if bits & (1 << gx) != 0 {
                    let _ = area.draw_pixel((x + i as i32 * 8 + gx, y + gy as i32), color);
                }
            }
        }
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

pub fn draw(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    let left = 120i32;
    let width = 1200i32;
    let plot_w = width - left - 30;
    let row_h = 14i32;
    let rows_top = 90i32;
    let rows_h = row_h * chart.rows.len() as i32;
    let bars_top = rows_top + rows_h + 50;
    let bar_h = 18i32;
    let height = bars_top + bar_h * chart.bars.len() as i32 + 60;
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    text(&root, 10, 8, &chart.title, &BLACK);

    let end = chart
        .rows
        .iter()
        .flat_map(|r| r.spans.iter().map(|s| s.end).chain(r.marker))
        .chain(chart.phases.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    let x = |t: f64| left + ((t / end) * plot_w as f64) as i32;

    // Phase band.
    text(&root, 10, 40, "phase", &BLACK);
    for (s, e, p) in &chart.phases {
        root.draw(&Rectangle::new(
            [(x(*s), 34), (x(*e).max(x(*s) + 1), 54)],
            phase_color(p).filled(),
        ))
        .map_err(err)?;
    }
    // Legend.
    let mut lx = left;
    for (name, c) in [
        ("waiting", WAIT),
        ("STT", STT),
        ("evaluation", EVAL),
        ("scoring+release", SCORE),
        ("failed", FAILED),
        ("| ETA shown at upload", BLACK),
    ] {
        root.draw(&Rectangle::new([(lx, 62), (lx + 10, 72)], c.filled()))
            .map_err(err)?;
        text(&root, lx + 14, 63, name, &BLACK);
        lx += 24 + 8 * name.len() as i32;
    }
    // Time axis with ticks every "nice" step.
    let step = [
        1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    ]
    .into_iter()
    .find(|s| end / s <= 12.0)
    .unwrap_or(3600.0);
    let axis_y = rows_top + rows_h + 4;
    root.draw(&PathElement::new(
        vec![(left, axis_y), (left + plot_w, axis_y)],
        BLACK,
    ))
    .map_err(err)?;
    let mut t = 0.0;
    while t <= end {
        root.draw(&PathElement::new(
            vec![(x(t), axis_y), (x(t), axis_y + 4)],
            BLACK,
        ))
        .map_err(err)?;
        root.draw(&PathElement::new(
            vec![(x(t), rows_top), (x(t), axis_y)],
            RGBColor(240, 240, 240),
        ))
        .map_err(err)?;
        text(&root, x(t) - 8, axis_y + 8, &format!("{t:.0}s"), &BLACK);
        t += step;
    }
    // Per-student rows.
    for (i, r) in chart.rows.iter().enumerate() {
        let y = rows_top + i as i32 * row_h;
        text(&root, 10, y + 3, &r.label, &BLACK);
        for s in &r.spans {
            root.draw(&Rectangle::new(
                [
                    (x(s.start), y + 2),
                    (x(s.end).max(x(s.start) + 1), y + row_h - 2),
                ],
                s.color.filled(),
            ))
            .map_err(err)?;
        }
        if let Some(m) = r.marker {
            root.draw(&Rectangle::new(
                [(x(m) - 1, y), (x(m) + 1, y + row_h)],
                BLACK.filled(),
            ))
            .map_err(err)?;
        }
    }
    // Wall-time comparison.
    text(
        &root,
        10,
        bars_top - 20,
        "wall time to grade every submission",
        &BLACK,
    );
    let max_bar = chart.bars.iter().map(|b| b.1).fold(1.0f64, f64::max);
    for (i, (label, secs)) in chart.bars.iter().enumerate() {
        let y = bars_top + i as i32 * bar_h;
        text(&root, 10, y + 4, label, &BLACK);
        let w = ((secs / max_bar) * (plot_w - 220) as f64) as i32;
        root.draw(&Rectangle::new(
            [(left + 100, y + 2), (left + 100 + w.max(1), y + bar_h - 2)],
            RGBColor(90, 90, 160).filled(),
        ))
        .map_err(err)?;
        text(
            &root,
            left + 106 + w,
            y + 5,
            &format!("{secs:.1} s"),
            &BLACK,
        );
    }
    root.present().map_err(err)?;
    Ok(())
}
