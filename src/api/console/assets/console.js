// Agent Harness console: keeps the page's live parts current without reloading it.
// - Every element with an id and `data-live` is refreshed every 2 s from the same URL,
//   paused while the tab is hidden.
// - A `<pre data-events="URL">` shows a task's output as Server-Sent Events bring it.
// - A live part holding a ticked checkbox or the focus is left alone until it has neither
//   (a selection for a bulk action, a field being typed in).
// - `<input data-select-all="NAME">` ticks every checkbox named NAME in its form; a button with
//   `data-confirm` asks first.
"use strict";

(function () {
  const PERIOD_MS = 2000;
  let timer = null;

  async function refresh() {
    const live = document.querySelectorAll("[data-live][id]");
    if (live.length === 0) return;
    try {
      const r = await fetch(location.href, { headers: { "Accept": "text/html" }, credentials: "same-origin" });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const el of live) {
        if (busy(el)) continue;
        const fresh = doc.getElementById(el.id);
        if (fresh && fresh.innerHTML !== el.innerHTML) el.innerHTML = fresh.innerHTML;
      }
    } catch (_) {
      // A replica restarting: the next tick tries again.
    }
  }

  function busy(el) {
    if (el.querySelector("input[type=checkbox]:checked")) return true;
    const f = document.activeElement;
    return f !== null && f !== document.body && el.contains(f) && f.matches("input, textarea, select");
  }

  function start() {
    if (timer === null) timer = setInterval(refresh, PERIOD_MS);
  }

  function stop() {
    if (timer !== null) { clearInterval(timer); timer = null; }
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { stop(); } else { refresh(); start(); }
  });

  function follow(pre) {
    const source = new EventSource(pre.dataset.events);
    let first = true;
    function add(text) {
      if (first) { pre.textContent = ""; first = false; }
      pre.textContent += text;
      pre.scrollTop = pre.scrollHeight;
    }
    source.addEventListener("output", function (e) {
      const c = JSON.parse(e.data);
      if (c.skipped > 0) add("\n[… " + c.skipped + " bytes skipped …]\n");
      add(c.text);
    });
    source.addEventListener("progress", function (e) {
      const p = JSON.parse(JSON.parse(e.data).text);
      const el = document.getElementById("progress");
      if (el) {
        const pct = p.fraction == null ? "" : Math.round(p.fraction * 100) + "% ";
        el.textContent = pct + (p.message || "");
      }
    });
    source.addEventListener("end", function () {
      source.close();
      refresh();
    });
    source.addEventListener("error", function () {
      // The browser reconnects by itself (Last-Event-ID) unless the stream ended.
    });
  }

  document.addEventListener("change", function (e) {
    const all = e.target.closest("input[data-select-all]");
    if (!all || !all.form) return;
    for (const box of all.form.querySelectorAll("input[type=checkbox][name='" + all.dataset.selectAll + "']")) {
      box.checked = all.checked;
    }
  });

  document.addEventListener("click", function (e) {
    const b = e.target.closest("button[data-confirm]");
    if (b && !window.confirm(b.dataset.confirm)) e.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", function () {
    for (const pre of document.querySelectorAll("pre[data-events]")) follow(pre);
    if (!document.hidden) start();
  });
})();
