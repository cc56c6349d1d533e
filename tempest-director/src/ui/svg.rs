//! The UI's pictures, drawn on the server as inline SVG: the time charts
//! and the pipeline DAG.
//!
//! Everything taken from outside (task names above all) is escaped here,
//! because the templates insert these strings unescaped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::fmt::rate;

/// Escapes text for SVG/XML content and attribute values.
pub fn esc(s: &str) -> String {
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

/// One line of a chart: `(Unix ms, value)`, a `None` value is a gap.
pub struct Series<'a> {
    /// Its name in the legend.
    pub name: &'a str,
    /// Its CSS class (its colour).
    pub class: &'a str,
    /// Its points, oldest first.
    pub points: Vec<(u64, Option<f64>)>,
}

const CHART_W: f64 = 640.0;
const CHART_H: f64 = 190.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 24.0;

/// The smallest of 1, 2, 2.5, 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn axis_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// A line chart of `series` over the `window_ms` up to `now_ms`, with the
/// unit on the y axis. A gap longer than three typical steps breaks a line.
pub fn chart(
    id: &str,
    title: &str,
    unit: &str,
    now_ms: u64,
    window_ms: u64,
    series: &[Series<'_>],
) -> String {
    let start = now_ms.saturating_sub(window_ms);
    let visible = |ts: u64| ts >= start && ts <= now_ms;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(ts, _)| visible(*ts))
        .filter_map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let top = nice_ceiling(max * 1.05);
    let (pw, ph) = (CHART_W - LEFT - RIGHT, CHART_H - TOP - BOTTOM);
    let x = |ts: u64| LEFT + pw * (ts.saturating_sub(start) as f64) / (window_ms.max(1) as f64);
    let y = |v: f64| TOP + ph * (1.0 - (v / top).clamp(0.0, 1.0));
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg id="{id}" class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{t}" xmlns="http://www.w3.org/2000/svg"><title>{t}</title>"#,
        id = esc(id),
        t = esc(title),
    );
    let _ = write!(
        out,
        r#"<text class="axis" x="{LEFT}" y="14">{}</text>"#,
        esc(unit)
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = write!(
            out,
            r#"<line class="grid" x1="{LEFT}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}"/><text class="axis" x="{tx}" y="{ty:.1}" text-anchor="end">{label}</text>"#,
            x2 = CHART_W - RIGHT,
            tx = LEFT - 6.0,
            ty = yy + 4.0,
            label = axis_label(v),
        );
    }
    let minutes = window_ms / 60_000;
    for m in (0..=minutes).step_by(5.max(minutes as usize / 3)) {
        let ts = now_ms.saturating_sub(m * 60_000);
        let label = if m == 0 {
            "now".to_owned()
        } else {
            format!("−{m} min")
        };
        let anchor = if m == 0 { "end" } else { "middle" };
        let _ = write!(
            out,
            r#"<text class="axis" x="{:.1}" y="{:.1}" text-anchor="{anchor}">{label}</text>"#,
            x(ts),
            CHART_H - 6.0
        );
    }
    let mut any = false;
    for (n, s) in series.iter().enumerate() {
        let pts: Vec<(u64, Option<f64>)> = s
            .points
            .iter()
            .copied()
            .filter(|(ts, _)| visible(*ts))
            .collect();
        let mut steps: Vec<u64> = pts
            .windows(2)
            .map(|w| w[1].0.saturating_sub(w[0].0))
            .collect();
        steps.sort_unstable();
        let typical = steps.get(steps.len() / 2).copied().unwrap_or(0);
        let max_gap = (typical * 3).max(5_000);
        let mut segments: Vec<Vec<(f64, f64)>> = Vec::new();
        let mut last_ts: Option<u64> = None;
        for (ts, v) in pts {
            let v = v.filter(|v| v.is_finite());
            let broken = last_ts.is_none_or(|l| ts.saturating_sub(l) > max_gap);
            match v {
                Some(v) => {
                    if broken || segments.is_empty() {
                        segments.push(Vec::new());
                    }
                    if let Some(seg) = segments.last_mut() {
                        seg.push((x(ts), y(v)));
                    }
                    last_ts = Some(ts);
                }
                None => last_ts = None,
            }
        }
        for seg in &segments {
            any = true;
            if seg.len() == 1 {
                let _ = write!(
                    out,
                    r#"<circle class="line {}" cx="{:.1}" cy="{:.1}" r="2"/>"#,
                    esc(s.class),
                    seg[0].0,
                    seg[0].1
                );
                continue;
            }
            let coords: Vec<String> = seg.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = write!(
                out,
                r#"<polyline class="line {}" points="{}"/>"#,
                esc(s.class),
                coords.join(" ")
            );
        }
        let lx = CHART_W - RIGHT - 150.0 + 75.0 * n as f64;
        let _ = write!(
            out,
            r#"<rect class="key {c}" x="{lx:.1}" y="6" width="10" height="10"/><text class="axis" x="{tx:.1}" y="15">{name}</text>"#,
            c = esc(s.class),
            tx = lx + 14.0,
            name = esc(s.name),
        );
    }
    if !any {
        let _ = write!(
            out,
            r#"<text class="empty" x="{:.1}" y="{:.1}" text-anchor="middle">no data in the last {minutes} minutes</text>"#,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    }
    out.push_str("</svg>");
    out
}

/// A task as the DAG shows it.
pub struct DagTask<'a> {
    /// Its name.
    pub name: &'a str,
    /// Messages in per second.
    pub rate: f64,
    /// Worker instances.
    pub workers: u32,
}

/// An edge as the DAG shows it.
pub struct DagEdge<'a> {
    /// Upstream task.
    pub from: &'a str,
    /// Downstream task.
    pub to: &'a str,
    /// Its grouping.
    pub grouping: &'a str,
}

/// A source as the DAG shows it.
pub struct DagSource<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its roots acked per second.
    pub rate: f64,
    /// Whether it reports healthy (`None`: not reported).
    pub healthy: Option<bool>,
}

/// An edge from a source to a task it feeds.
pub struct DagSourceEdge<'a> {
    /// The source.
    pub source: &'a str,
    /// The task it feeds.
    pub to: &'a str,
}

const NODE_W: f64 = 160.0;
const NODE_H: f64 = 46.0;
const COL: f64 = 215.0;
const ROW: f64 = 64.0;
const PAD: f64 = 10.0;

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The layers of the DAG: the sources in layer 0, each task at one more
/// than its deepest upstream task. `None` when the edges are unknown (no
/// edge between tasks nor from a source, and more than one task).
fn layers(
    tasks: &[DagTask<'_>],
    edges: &[DagEdge<'_>],
    fed_by_sources: bool,
) -> Option<BTreeMap<String, usize>> {
    let names: BTreeSet<&str> = tasks.iter().map(|t| t.name).collect();
    let edges: Vec<(&str, &str)> = edges
        .iter()
        .filter(|e| names.contains(e.from) && names.contains(e.to) && e.from != e.to)
        .map(|e| (e.from, e.to))
        .collect();
    if edges.is_empty() && !fed_by_sources && tasks.len() != 1 {
        return None;
    }
    // Longest path by relaxation; a cycle (which a validated pipeline never
    // has) stops after as many rounds as there are tasks.
    let mut depth: BTreeMap<String, usize> = names.iter().map(|n| ((*n).to_owned(), 1)).collect();
    for _ in 0..names.len() {
        let mut changed = false;
        for (from, to) in &edges {
            let d = depth[*from] + 1;
            if d > depth[*to] && d <= names.len() {
                depth.insert((*to).to_owned(), d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    Some(depth)
}

/// The pipeline drawn left to right: the sources in the first column, then
/// the tasks by depth, each labelled with its rate; an unhealthy source is
/// marked so (class `unhealthy`, and the word). Each source is linked to
/// the tasks its `source_edges` name; without any (one unnamed source, or a
/// server older than named sources) every source feeds the roots, the tasks
/// no edge leads to. Without edges at all (the server has not reported its
/// pipeline) the tasks stand in one column, unconnected. A source that an
/// edge names but `sources` lacks is drawn too; with no source at all
/// (before the server reports them) one node named `source` stands for
/// them.
pub fn dag(
    sources: &[DagSource<'_>],
    tasks: &[DagTask<'_>],
    edges: &[DagEdge<'_>],
    source_edges: &[DagSourceEdge<'_>],
) -> String {
    let task_names: BTreeSet<&str> = tasks.iter().map(|t| t.name).collect();
    let source_edges: Vec<&DagSourceEdge<'_>> = source_edges
        .iter()
        .filter(|e| task_names.contains(e.to))
        .collect();
    let mut all_sources: Vec<DagSource<'_>> = sources
        .iter()
        .map(|s| DagSource {
            name: s.name,
            rate: s.rate,
            healthy: s.healthy,
        })
        .collect();
    for e in &source_edges {
        if !all_sources.iter().any(|s| s.name == e.source) {
            all_sources.push(DagSource {
                name: e.source,
                rate: 0.0,
                healthy: None,
            });
        }
    }
    if all_sources.is_empty() {
        // Before the server reports its sources, one node stands for them.
        all_sources.push(DagSource {
            name: "source",
            rate: 0.0,
            healthy: None,
        });
    }
    let known = layers(tasks, edges, !source_edges.is_empty());
    let depth = |name: &str| {
        known
            .as_ref()
            .and_then(|l| l.get(name).copied())
            .unwrap_or(1)
    };
    let mut by_layer: BTreeMap<usize, Vec<&DagTask<'_>>> = BTreeMap::new();
    for t in tasks {
        by_layer.entry(depth(t.name)).or_default().push(t);
    }
    let columns = by_layer.keys().max().copied().unwrap_or(0) + 1;
    let rows = by_layer
        .values()
        .map(Vec::len)
        .chain([all_sources.len()])
        .max()
        .unwrap_or(0)
        .max(1);
    let width = PAD * 2.0 + COL * (columns - 1) as f64 + NODE_W;
    let height =
        PAD * 2.0 + ROW * (rows - 1) as f64 + NODE_H + if known.is_none() { 22.0 } else { 0.0 };
    let band = ROW * (rows - 1) as f64;
    let place = |layer: usize, i: usize, n: usize| -> (f64, f64) {
        let x = PAD + COL * layer as f64;
        let offset = (band - ROW * (n.saturating_sub(1)) as f64) / 2.0;
        (x, PAD + offset + ROW * i as f64)
    };
    let mut pos: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (layer, ts) in &by_layer {
        for (i, t) in ts.iter().enumerate() {
            pos.insert(t.name, place(*layer, i, ts.len()));
        }
    }
    let source_pos: BTreeMap<&str, (f64, f64)> = all_sources
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name, place(0, i, all_sources.len())))
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg id="dag" class="dag" viewBox="0 0 {width:.0} {height:.0}" width="{width:.0}" height="{height:.0}" role="img" aria-label="pipeline" xmlns="http://www.w3.org/2000/svg"><title>pipeline</title><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>"#
    );
    let link = |out: &mut String, a: (f64, f64), b: (f64, f64), label: &str| {
        let (x1, y1) = (a.0 + NODE_W, a.1 + NODE_H / 2.0);
        let (x2, y2) = (b.0 - 2.0, b.1 + NODE_H / 2.0);
        let mid = (x1 + x2) / 2.0;
        let _ = write!(
            out,
            r#"<path class="edge" d="M{x1:.1},{y1:.1} C{mid:.1},{y1:.1} {mid:.1},{y2:.1} {x2:.1},{y2:.1}" marker-end="url(#arrow)"><title>{}</title></path>"#,
            esc(label)
        );
    };
    if let Some(l) = &known {
        let mut fed: BTreeSet<&str> = BTreeSet::new();
        for e in edges {
            if let (Some(a), Some(b)) = (pos.get(e.from), pos.get(e.to)) {
                if e.from != e.to {
                    link(
                        &mut out,
                        *a,
                        *b,
                        &format!("{} → {} ({})", e.from, e.to, e.grouping),
                    );
                    fed.insert(e.to);
                }
            }
        }
        if source_edges.is_empty() {
            // Every source feeds the roots: the tasks no edge leads to.
            for t in tasks
                .iter()
                .filter(|t| !fed.contains(t.name) && l.contains_key(t.name))
            {
                for (name, at) in &source_pos {
                    link(&mut out, *at, pos[t.name], &format!("{name} → {}", t.name));
                }
            }
        } else {
            for e in &source_edges {
                if let (Some(a), Some(b)) = (source_pos.get(e.source), pos.get(e.to)) {
                    link(&mut out, *a, *b, &format!("{} → {}", e.source, e.to));
                }
            }
        }
    }
    let node = |out: &mut String,
                id: &str,
                class: &str,
                at: (f64, f64),
                (title, full): (&str, &str),
                line2: &str,
                value: f64| {
        let _ = write!(
            out,
            r#"<g id="{id}" class="node {class}" data-rate="{value:.3}"><title>{full}</title><rect x="{x:.1}" y="{y:.1}" width="{NODE_W}" height="{NODE_H}" rx="6"/><text class="name" x="{tx:.1}" y="{ty1:.1}">{title}</text><text class="rate" x="{tx:.1}" y="{ty2:.1}">{line2}</text></g>"#,
            id = esc(id),
            x = at.0,
            y = at.1,
            tx = at.0 + 10.0,
            ty1 = at.1 + 19.0,
            ty2 = at.1 + 36.0,
            title = esc(&clip(title, 19)),
            full = esc(full),
            line2 = esc(line2),
        );
    };
    for s in &all_sources {
        let acked = format!("{} acked/s", rate(s.rate));
        let (class, full, line2) = match s.healthy {
            Some(false) => (
                "source unhealthy",
                format!("source {}: unhealthy", s.name),
                format!("unhealthy · {acked}"),
            ),
            Some(true) => ("source", format!("source {}: healthy", s.name), acked),
            None => ("source", format!("source {}", s.name), acked),
        };
        node(
            &mut out,
            &format!("dag-source-{}", s.name),
            class,
            source_pos[s.name],
            (s.name, &full),
            &line2,
            s.rate,
        );
    }
    for t in tasks {
        let line2 = format!("{} msg/s · ×{}", rate(t.rate), t.workers);
        node(
            &mut out,
            &format!("dag-task-{}", t.name),
            "task",
            pos[t.name],
            (t.name, t.name),
            &line2,
            t.rate,
        );
    }
    if known.is_none() {
        let _ = write!(
            out,
            r#"<text class="empty" x="{PAD}" y="{:.1}">edges appear once the topology server reports its pipeline</text>"#,
            height - 6.0
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str) -> DagTask<'_> {
        DagTask {
            name,
            rate: 12.5,
            workers: 2,
        }
    }

    #[test]
    fn layers_follow_the_longest_path() {
        let tasks = [task("split"), task("count"), task("output"), task("audit")];
        let edges = [
            DagEdge {
                from: "split",
                to: "count",
                grouping: "key",
            },
            DagEdge {
                from: "count",
                to: "output",
                grouping: "shuffle",
            },
            DagEdge {
                from: "split",
                to: "output",
                grouping: "shuffle",
            },
            DagEdge {
                from: "split",
                to: "audit",
                grouping: "all",
            },
            DagEdge {
                from: "ghost",
                to: "audit",
                grouping: "all",
            },
        ];
        let l = layers(&tasks, &edges, false).unwrap();
        assert_eq!(
            (l["split"], l["count"], l["output"], l["audit"]),
            (1, 2, 3, 2)
        );
        let svg = dag(&[source("default", Some(true))], &tasks, &edges, &[]);
        // Four task edges and one from the source into the root.
        assert_eq!(svg.matches("class=\"edge\"").count(), 5, "{svg}");
        assert!(svg.contains("id=\"dag-task-count\""));
        assert!(svg.contains("12.5 msg/s · ×2"));
        assert!(svg.contains("id=\"dag-source-default\" class=\"node source\""));
        assert!(svg.contains("<title>default → split</title>"), "{svg}");
        assert!(!svg.contains("unhealthy"));
        assert!(!svg.contains("edges appear"));
    }

    fn source(name: &str, healthy: Option<bool>) -> DagSource<'_> {
        DagSource {
            name,
            rate: 3.0,
            healthy,
        }
    }

    /// The `(x, y)` of the node with `id`.
    fn at(svg: &str, id: &str) -> (f64, f64) {
        let from = svg.find(&format!("id=\"{id}\"")).unwrap();
        let rect = &svg[from..][svg[from..].find("<rect").unwrap()..];
        let num = |attr: &str| -> f64 {
            let v = &rect[rect.find(attr).unwrap() + attr.len()..];
            v[..v.find('"').unwrap()].parse().unwrap()
        };
        (num(" x=\""), num(" y=\""))
    }

    #[test]
    fn several_sources_each_feed_their_tasks() {
        let tasks = [task("parse"), task("audit"), task("store")];
        let edges = [DagEdge {
            from: "parse",
            to: "store",
            grouping: "key",
        }];
        let source_edges = [
            DagSourceEdge {
                source: "orders",
                to: "parse",
            },
            DagSourceEdge {
                source: "refunds",
                to: "parse",
            },
            DagSourceEdge {
                source: "refunds",
                to: "audit",
            },
            // A task the topology does not have: not drawn.
            DagSourceEdge {
                source: "refunds",
                to: "ghost",
            },
            // A source the figures lack yet: drawn all the same.
            DagSourceEdge {
                source: "late",
                to: "audit",
            },
        ];
        let svg = dag(
            &[source("orders", Some(true)), source("refunds", Some(false))],
            &tasks,
            &edges,
            &source_edges,
        );
        // One task edge and four from sources.
        assert_eq!(svg.matches("class=\"edge\"").count(), 5, "{svg}");
        for title in [
            "orders → parse",
            "refunds → parse",
            "refunds → audit",
            "late → audit",
            "parse → store (key)",
        ] {
            assert!(
                svg.contains(&format!("<title>{title}</title>")),
                "{title}: {svg}"
            );
        }
        assert!(!svg.contains("ghost"));
        assert!(svg.contains("id=\"dag-source-orders\" class=\"node source\""));
        assert!(svg.contains("<title>source orders: healthy</title>"));
        // The unhealthy source is marked, in its class and in words.
        assert!(
            svg.contains("id=\"dag-source-refunds\" class=\"node source unhealthy\""),
            "{svg}"
        );
        assert!(svg.contains("<title>source refunds: unhealthy</title>"));
        assert!(svg.contains(">unhealthy · 3.00 acked/s<"), "{svg}");
        assert_eq!(svg.matches("unhealthy").count(), 3, "{svg}");
        assert!(svg.contains("id=\"dag-source-late\" class=\"node source\""));
        // The sources stand in the first column, one above the other; the
        // roots in the second, the rest after them.
        let (o, r, l) = (
            at(&svg, "dag-source-orders"),
            at(&svg, "dag-source-refunds"),
            at(&svg, "dag-source-late"),
        );
        assert!(o.0 == r.0 && r.0 == l.0 && o.1 < r.1 && r.1 < l.1, "{svg}");
        let (p, a, s) = (
            at(&svg, "dag-task-parse"),
            at(&svg, "dag-task-audit"),
            at(&svg, "dag-task-store"),
        );
        assert!(o.0 < p.0 && p.0 == a.0 && a.0 < s.0, "{svg}");
        assert!(!svg.contains("edges appear"));

        // Source edges alone place the tasks (they are all roots).
        let svg = dag(
            &[source("orders", None)],
            &tasks[..2],
            &[],
            &source_edges[..3],
        );
        assert!(!svg.contains("edges appear"));
        assert_eq!(svg.matches("class=\"edge\"").count(), 3, "{svg}");
    }

    #[test]
    fn without_source_edges_every_source_feeds_the_roots() {
        let tasks = [task("split"), task("count")];
        let edges = [DagEdge {
            from: "split",
            to: "count",
            grouping: "key",
        }];
        let svg = dag(
            &[source("a", None), source("b", Some(false))],
            &tasks,
            &edges,
            &[],
        );
        assert_eq!(svg.matches("class=\"edge\"").count(), 3, "{svg}");
        assert!(svg.contains("<title>a → split</title>"));
        assert!(svg.contains("<title>b → split</title>"));
        assert!(svg.contains("<title>source a</title>"));
        // Before any report, one node stands for the sources.
        let svg = dag(&[], &tasks, &edges, &[]);
        assert!(svg.contains("id=\"dag-source-source\""), "{svg}");
        assert!(svg.contains("<title>source → split</title>"), "{svg}");
    }

    #[test]
    fn without_edges_the_tasks_stand_unconnected() {
        let svg = dag(&[], &[task("a"), task("b")], &[], &[]);
        assert_eq!(svg.matches("class=\"edge\"").count(), 0);
        assert!(svg.contains("edges appear"));
        // One task needs no edges: the source feeds it.
        let svg = dag(&[], &[task("a")], &[], &[]);
        assert_eq!(svg.matches("class=\"edge\"").count(), 1);
    }

    #[test]
    fn names_are_escaped() {
        let svg = dag(
            &[source("<s>", Some(false))],
            &[task("a\"<b>")],
            &[],
            &[DagSourceEdge {
                source: "<i>",
                to: "a\"<b>",
            }],
        );
        assert!(!svg.contains("<s>") && !svg.contains("<i>"), "{svg}");
        assert!(!svg.contains("<b>") && !svg.contains("<s>"), "{svg}");
        assert!(svg.contains("a&quot;&lt;b&gt;"));
        let c = chart("c\"", "<t>", "msg/s", 1000, 1000, &[]);
        assert!(!c.contains("<t>") && c.contains("&lt;t&gt;"));
    }

    #[test]
    fn charts_scale_break_at_gaps_and_say_when_empty() {
        let now = 15 * 60_000;
        let empty = chart(
            "t",
            "t",
            "msg/s",
            now,
            15 * 60_000,
            &[Series {
                name: "acked",
                class: "a",
                points: vec![],
            }],
        );
        assert!(empty.contains("no data"));
        let points = vec![
            (now - 10_000, Some(50.0)),
            (now - 8_000, Some(80.0)),
            (now - 6_000, None),
            (now - 4_000, Some(60.0)),
            (now - 2_000, Some(70.0)),
            // Outside the window: ignored.
            (now + 60_000, Some(1e9)),
        ];
        let c = chart(
            "t",
            "t",
            "msg/s",
            now,
            15 * 60_000,
            &[Series {
                name: "acked",
                class: "a",
                points,
            }],
        );
        assert_eq!(c.matches("<polyline").count(), 2, "{c}");
        assert!(c.contains(">100<"), "the axis tops at a round 100: {c}");
        assert!(!c.contains("no data"));
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(1200.0), 2000.0);
    }
}
