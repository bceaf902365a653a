//! The drill's timeline picture (SVG, plotters) and HTML report.

use std::path::Path;

use plotters::prelude::*;

use crate::drill::DrillReport;

const COLORS: [RGBColor; 2] = [RGBColor(31, 111, 235), RGBColor(214, 90, 49)];

/// Messages per second accepted per region over time, with the scenario's
/// events marked.
///
/// # Errors
/// When the file cannot be written.
pub fn timeline(
    path: &Path,
    series: &[(usize, Vec<(f64, f64)>)],
    events: &[(f64, String)],
) -> anyhow::Result<()> {
    let t_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(10.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "messages accepted from devices per second, by region (primary only)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the drill started")
        .y_desc("msgs/s")
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (region, points) in series {
        let color = COLORS[*region % 2];
        let name = if *region == 0 { "region a" } else { "region b" };
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    for (i, (t, label)) in events.iter().enumerate() {
        let color = RGBColor(90, 90, 90);
        chart.draw_series(LineSeries::new(
            vec![(*t, 0.0), (*t, y_max)],
            color.stroke_width(1),
        ))?;
        let y = y_max * (0.95 - 0.07 * (i % 4) as f64);
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (*t + t_max * 0.005, y),
            ("sans-serif", 13).into_font().color(&color),
        )))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The HTML report, with the picture inline (no external assets).
///
/// # Errors
/// When the picture cannot be read.
pub fn html(r: &DrillReport, svg: &Path) -> anyhow::Result<String> {
    let picture = std::fs::read_to_string(svg)?;
    let verdict = if r.passed {
        "PASSED: nothing acknowledged was lost"
    } else {
        "FAILED: acknowledged messages were lost"
    };
    let row = |k: &str, v: String| format!("<tr><th>{k}</th><td>{v}</td></tr>");
    let rows = [
        row(
            "mode / replication",
            format!("{} / {}", r.mode.as_str(), r.replication),
        ),
        row("devices", r.devices.to_string()),
        row("sent", r.sent.to_string()),
        row("acknowledged (replicated)", r.acknowledged.to_string()),
        row("stored (final primary)", r.stored.to_string()),
        row("stored by region", format!("{:?}", r.stored_by_region)),
        row(
            "<strong>lost</strong>",
            format!("<strong>{}</strong>", r.lost),
        ),
        row("records stored twice", r.duplicate_records.to_string()),
        row("duplicates suppressed", r.duplicates_suppressed.to_string()),
        row("dropped by outboxes", r.dropped.to_string()),
        row("peak messages in outboxes", r.peak_in_outbox.to_string()),
        row(
            "RTO per device p50 / p99 / max",
            format!("{} / {} / {} ms", r.rto_ms.p50, r.rto_ms.p99, r.rto_ms.max),
        ),
        row(
            "detect / promote / first publish",
            format!(
                "{} / {} / {} ms",
                r.steps.detect_ms, r.steps.promote_ms, r.steps.first_publish_ms
            ),
        ),
        row(
            "failback (planned promotion back)",
            format!("{} ms", r.steps.failback_ms),
        ),
        row(
            "registry divergence before / after failback",
            format!(
                "{} / {}",
                r.registry_divergence.before_failback, r.registry_divergence.after_failback
            ),
        ),
        row(
            "archived at failback / missing from the new history",
            format!("{} / {}", r.archived_records, r.archive_missing),
        ),
    ]
    .concat();
    Ok(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Fleet drill</title>
<style>body{{font:15px system-ui,sans-serif;margin:24px;color:#1f2328}} table{{border-collapse:collapse}}
th,td{{text-align:left;padding:4px 12px;border-bottom:1px solid #ddd}} .ok{{color:#1a7f37}} .bad{{color:#cf222e}}</style></head>
<body><h1>Fleet drill</h1><p class="{}"><strong>{verdict}</strong></p><table>{rows}</table>
<h2>Timeline</h2>{picture}</body></html>"#,
        if r.passed { "ok" } else { "bad" }
    ))
}
