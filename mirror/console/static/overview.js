// The overview page: polls /api/v1/overview every few seconds and redraws the cards,
// the two charts (uPlot) and the tables in place, without reloading the page.
"use strict";

(() => {
  const C = window.Console;
  const POLL_MS = 5000;
  const COLORS = { hits: "#16a34a", misses: "#f59e0b", cache: "#2563eb", peer: "#8b5cf6", upstream: "#f97316" };
  let range = "hour";
  let latest = null;
  const charts = {};

  // Bars stacked by drawing cumulative sums, the largest first; the legend shows each
  // part's own value, not the sum.
  function stackedChart(container, parts, formatValue) {
    const bars = uPlot.paths.bars({ size: [0.8, 40] });
    let own = [];
    let step = 60;
    const series = [{ label: "time", value: (u, t) => (t === null ? "total" : new Date(t * 1000).toLocaleTimeString()) }];
    for (let i = parts.length - 1; i >= 0; i--) {
      const part = parts[i];
      series.push({
        label: part.label,
        fill: part.color,
        stroke: part.color,
        width: 0,
        paths: bars,
        points: { show: false },
        // Under the cursor, that bucket's value; otherwise the window's total.
        value: (u, v, si, idx) => {
          if (own[i] === undefined) return "–";
          return formatValue(idx === null ? own[i].reduce((a, b) => a + b, 0) : own[i][idx]);
        },
      });
    }
    const chart = new uPlot(
      {
        width: Math.max(300, container.clientWidth),
        height: 220,
        series,
        scales: {
          // Half a bucket of room each side, so the first and last bars are whole.
          x: { time: true, range: (u, min, max) => [min - step / 2, max + step / 2] },
          y: { range: (u, min, max) => [0, Math.max(1, max)] },
        },
        axes: [{}, { values: (u, ticks) => ticks.map(formatValue), size: 84 }],
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      },
      [[], ...parts.map(() => [])],
      container,
    );
    return {
      chart,
      update(times, values, bucket) {
        own = values;
        step = bucket;
        const stacked = [];
        let running = times.map(() => 0);
        for (const column of values) {
          running = running.map((sum, idx) => sum + column[idx]);
          stacked.push(running);
        }
        chart.setData([times, ...stacked.reverse()]);
      },
    };
  }

  function count(n) {
    return Number.isInteger(n) ? String(n) : n.toFixed(1);
  }

  function setupCharts() {
    charts.requests = stackedChart(document.getElementById("chart-requests"), [
      { label: "hits", color: COLORS.hits },
      { label: "misses", color: COLORS.misses },
    ], count);
    charts.bytes = stackedChart(document.getElementById("chart-bytes"), [
      { label: "disk", color: COLORS.cache },
      { label: "peer", color: COLORS.peer },
      { label: "upstream", color: COLORS.upstream },
    ], C.bytes);
    window.addEventListener("resize", () => {
      for (const { chart } of Object.values(charts)) {
        chart.setSize({ width: Math.max(300, chart.root.parentElement.clientWidth), height: 220 });
      }
    });
  }

  function sum(points, pick) {
    return points.reduce((total, p) => total + pick(p), 0);
  }

  function renderTraffic(data) {
    const { points, step } = data.traffic[range];
    const times = points.map((p) => p.t);
    charts.requests.update(times, [points.map((p) => p.hits), points.map((p) => p.misses)], step);
    charts.bytes.update(times, [
      points.map((p) => p.bytes.cache),
      points.map((p) => p.bytes.peer),
      points.map((p) => p.bytes.upstream),
    ], step);
    const hits = sum(points, (p) => p.hits);
    const misses = sum(points, (p) => p.misses);
    C.show("hit-ratio", C.percent(data.hit_ratio[range]), data.hit_ratio[range]);
    C.show("hits", String(hits), hits);
    C.show("misses", String(misses), misses);
    for (const source of ["cache", "peer", "upstream"]) {
      const total = sum(points, (p) => p.bytes[source]);
      C.show("bytes-" + source, C.bytes(total), total);
    }
    C.show("saved", C.bytes(data.bytes_saved[range]), data.bytes_saved[range]);
    C.show("saved-total", C.bytes(data.bytes_saved.total), data.bytes_saved.total);
  }

  function renderUsage(usage) {
    const max = usage.max_size;
    C.show("usage-bytes", C.bytes(usage.bytes), usage.bytes);
    C.show("usage-max", max === null ? "cached (no max_size)" : `of ${C.bytes(max)} (max_size)`, max);
    // null until the first catalog snapshot is taken
    C.show("usage-blobs", usage.blobs === null ? "–" : String(usage.blobs), usage.blobs);
    const meter = document.getElementById("usage-meter");
    meter.hidden = max === null; // no limit: the disk meter below says it all
    meter.value = max ? Math.min(1, usage.bytes / max) : 0;
    meter.title = max ? C.percent(usage.bytes / max) + " of max_size" : "";
    const used = usage.disk_total - usage.disk_free;
    C.show("disk-used", C.bytes(used), used);
    C.show("disk-total", C.bytes(usage.disk_total), usage.disk_total);
    C.show("disk-free", C.bytes(usage.disk_free), usage.disk_free);
    const disk = document.getElementById("disk-meter");
    disk.value = usage.disk_total ? used / usage.disk_total : 0;
    disk.title = usage.disk_total ? C.percent(used / usage.disk_total) + " of the disk" : "";
  }

  function errorsCell(errors) {
    const causes = Object.entries(errors || {}).filter(([, n]) => n > 0);
    if (causes.length === 0) return C.el("td", { class: "ok" }, "none");
    return C.el("td", { class: "bad" }, causes.map(([cause, n]) => `${cause}: ${n}`).join(", "));
  }

  function credentialsCell(credentials) {
    if (!credentials || credentials.state === "none") return C.el("td", { class: "muted" }, "anonymous");
    const text = (credentials.source || "password") + ": " + credentials.state;
    return C.el("td", { class: credentials.state === "ok" ? "ok" : "bad", title: credentials.error || null }, text);
  }

  function renderUpstreams(upstreams) {
    C.fill(document.querySelector("#upstreams tbody"), upstreams.map((u) => C.el("tr", { dataset: { upstream: u.name } },
      C.el("td", {}, u.name),
      C.el("td", {}, C.el("code", {}, u.url)),
      C.el("td", {}, C.when(u.last_success)),
      errorsCell(u.errors),
      C.el("td", {}, u.rate_limit ? `${u.rate_limit.remaining}${u.rate_limit.limit === null ? "" : " / " + u.rate_limit.limit}` : "–"),
      credentialsCell(u.credentials),
    )));
  }

  function renderDownloads(downloads) {
    C.fill(document.querySelector("#downloads tbody"), downloads.map((d) => C.el("tr", {},
      C.el("td", {}, C.digestCell(d.digest)),
      C.el("td", {}, d.upstream),
      C.el("td", {}, d.repository),
      C.el("td", {},
        C.el("progress", { max: d.size || 1, value: d.size ? d.received : null }),
        " " + C.bytes(d.received) + (d.size ? " of " + C.bytes(d.size) : "")),
      C.el("td", { class: "num" }, d.clients),
      C.el("td", {}, C.when(d.started)),
    )), document.getElementById("downloads-empty"));
  }

  function renderPulls(pulls) {
    C.fill(document.querySelector("#pulls tbody"), pulls.map((p) => {
      const image = `${p.upstream}/${p.repository}` + (p.reference.startsWith("sha256:") ? "@" + C.shortDigest(p.reference) : ":" + p.reference);
      const link = C.el("a", { href: "/ui/browse?" + new URLSearchParams({ upstream: p.upstream, repository: p.repository }) }, image);
      return C.el("tr", {},
        C.el("td", {}, C.when(p.time)),
        C.el("td", {}, p.user || "anonymous"),
        C.el("td", { title: p.reference }, link),
        C.el("td", {}, p.kind),
        C.el("td", { class: "cache-" + p.cache }, p.cache),
        C.el("td", { class: p.status >= 400 ? "bad" : null }, p.status),
      );
    }), document.getElementById("pulls-empty"));
  }

  function renderReplicas(replicas) {
    document.getElementById("replicas-card").hidden = replicas.length === 0;
    C.fill(document.querySelector("#replicas tbody"), replicas.map((r) => C.el("tr", {},
      C.el("td", {}, C.el("code", {}, r.url)),
      C.el("td", { class: r.alive ? "ok" : "bad" }, r.alive ? "alive" : "unreachable"),
    )));
  }

  function render(data) {
    renderUsage(data.usage);
    renderTraffic(data);
    renderUpstreams(data.upstreams);
    renderDownloads(data.downloads);
    renderPulls(data.recent_pulls);
    renderReplicas(data.replicas);
    const refreshed = document.getElementById("refreshed");
    refreshed.textContent = "updated " + new Date(data.generated_at * 1000).toLocaleTimeString();
    refreshed.dataset.value = String(data.generated_at);
    refreshed.classList.remove("bad");
  }

  async function poll() {
    try {
      latest = await C.get("/api/v1/overview");
      render(latest);
    } catch (error) {
      const refreshed = document.getElementById("refreshed");
      refreshed.textContent = "update failed: " + C.describe(error);
      refreshed.classList.add("bad");
    } finally {
      // One request at a time, and none while the tab is hidden.
      setTimeout(() => (document.hidden ? document.addEventListener("visibilitychange", poll, { once: true }) : poll()), POLL_MS);
    }
  }

  function chooseRange(chosen) {
    range = chosen;
    for (const button of document.querySelectorAll("[data-range]")) {
      button.setAttribute("aria-pressed", String(button.dataset.range === range));
    }
    for (const label of document.querySelectorAll(".range-label")) {
      label.textContent = range === "hour" ? "last hour" : "last day";
    }
    if (latest) renderTraffic(latest);
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupCharts();
    for (const button of document.querySelectorAll("[data-range]")) {
      button.addEventListener("click", () => chooseRange(button.dataset.range));
    }
    poll();
  });
})();
