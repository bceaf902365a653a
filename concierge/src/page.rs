//! `GET /`: the operators' status page, rendered on the server with no
//! external assets (machines here are offline) and refreshed every 2 s.

use std::fmt::Write;

use crate::view::Fleet;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 1500 => "just now".into(),
        Some(ms) => format!("{:.0} s ago", ms as f64 / 1000.0),
    }
}

/// The page.
pub fn render(fleet: &Fleet) -> String {
    let regions = fleet.views();
    let active = fleet.active();
    let mut cards = String::new();
    for r in &regions {
        let role = r.role.map_or("unknown", |ro| ro.as_str());
        let health = if r.healthy { "healthy" } else { "down" };
        let _ = write!(
            cards,
            r#"<section class="card {health}{act}" data-region="{region}">
  <header><h2>{region}</h2><span class="badge {role}">{role}</span>{active_badge}</header>
  <dl>
    <dt>health</dt><dd class="health">{health}</dd>
    <dt>epoch</dt><dd>{epoch}</dd>
    <dt>replication lag</dt><dd>{lag}</dd>
    <dt>connected devices</dt><dd class="devices">{devices}</dd>
    <dt>MQTT</dt><dd><code>{mqtt}</code></dd>
    <dt>last seen</dt><dd>{seen}</dd>
  </dl>{alone}{problem}
</section>
"#,
            act = if r.active { " active" } else { "" },
            region = esc(r.region.as_str()),
            active_badge = if r.active {
                r#"<span class="badge live">active</span>"#
            } else {
                ""
            },
            epoch = r.epoch.map_or("–".to_string(), |e| e.to_string()),
            lag = r
                .replication_lag_ms
                .map_or("–".to_string(), |l| format!("{l} ms")),
            devices = r
                .connected_devices
                .map_or("–".to_string(), |d| d.to_string()),
            mqtt = esc(&r.mqtt_url),
            seen = ago(r.last_seen_ms_ago),
            alone = r.detached_since_ms.map_or(String::new(), |since| format!(
                r#"<p class="problem alone">running alone since {} UTC: the other region is detached, {} records written without a second copy</p>"#,
                format_utc(since / 1000),
                r.written_while_detached.unwrap_or(0)
            )),
            problem = r.problem.as_ref().map_or(String::new(), |p| format!(
                r#"<p class="problem">{}</p>"#,
                esc(p)
            )),
        );
    }
    let mut timeline = String::new();
    for e in fleet.timeline() {
        let at = e.at_ms / 1000;
        let _ = write!(
            timeline,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            format_utc(at),
            esc(e.to.as_str()),
            e.mode.as_str(),
            e.epoch,
            e.took_ms,
            esc(&e.trigger)
        );
    }
    if timeline.is_empty() {
        timeline = r#"<tr><td colspan="6" class="none">no failover yet</td></tr>"#.into();
    }
    let headline = match &active {
        Some(a) => format!(
            r#"devices are sent to <strong id="active-region">{}</strong> (epoch {})"#,
            esc(a.region.as_str()),
            a.epoch
        ),
        None => r#"<strong id="active-region" class="none">no hub is active</strong>: devices wait and keep their messages"#.into(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fleet · {zone}</title>
<style>
body{{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#0f1419;color:#e6e6e6}}
main{{max-width:1100px;margin:0 auto;padding:24px}}
h1{{font-size:22px;margin:0 0 4px}} .sub{{color:#9aa5b1;margin:0 0 20px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:16px}}
.card{{background:#182029;border:1px solid #2a3542;border-radius:10px;padding:16px}}
.card.active{{border-color:#3fb950;box-shadow:0 0 0 1px #3fb950 inset}}
.card.down{{border-color:#f85149}}
.card header{{display:flex;align-items:center;gap:8px}} .card h2{{font-size:18px;margin:0;flex:1}}
.badge{{font-size:12px;padding:2px 8px;border-radius:999px;background:#2a3542}}
.badge.primary{{background:#1f6feb}} .badge.secondary{{background:#6e7681}} .badge.live{{background:#3fb950;color:#04260f}}
dl{{display:grid;grid-template-columns:auto 1fr;gap:4px 12px;margin:12px 0 0}} dt{{color:#9aa5b1}} dd{{margin:0}}
.health{{font-weight:600}} .down .health{{color:#f85149}} .healthy .health{{color:#3fb950}}
.problem{{color:#f0883e;font-size:13px;margin:10px 0 0;word-break:break-word}}
table{{width:100%;border-collapse:collapse;margin-top:8px}} th,td{{text-align:left;padding:6px 8px;border-bottom:1px solid #2a3542}}
th{{color:#9aa5b1;font-weight:500}} .none{{color:#9aa5b1}} code{{font-size:13px}}
h3{{margin:28px 0 0;font-size:16px}}
</style></head>
<body><main>
<h1>Fleet concierge · {zone}</h1>
<p class="sub">{headline}</p>
<div class="grid">
{cards}</div>
<h3>Failovers</h3>
<table id="timeline"><thead><tr><th>when (UTC)</th><th>to</th><th>mode</th><th>epoch</th><th>took</th><th>trigger</th></tr></thead>
<tbody>{timeline}</tbody></table>
</main></body></html>
"#,
        zone = esc(fleet.config.zone.trim_end_matches('.')),
    )
}

/// `YYYY-MM-DD HH:MM:SS` for seconds since the Unix epoch (UTC), without a
/// date crate for one timestamp format.
fn format_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_utc(1_795_435_958), "2026-11-23 12:12:38");
        assert_eq!(
            super::esc("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
    }
}
