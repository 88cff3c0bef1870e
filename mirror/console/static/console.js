// What every console page shares: calls to the JSON API (/api/v1/), the session (who
// is signed in, admin or not, the CSRF token), DOM building that never parses data as
// HTML, and formatting of sizes and times. Plain JS, no build step.
"use strict";

const Console = (() => {
  // Absolute URLs from location.origin: a page opened as http://user:pass@host/ui/
  // has those credentials in its base URL, and fetch() refuses a URL that holds them.
  const url = (path) => new URL(path, window.location.origin).href;

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function decode(response) {
    const type = response.headers.get("Content-Type") || "";
    const data = type.includes("application/json") ? await response.json() : null;
    if (!response.ok) {
      const error = (data && data.errors && data.errors[0]) || {};
      throw new ApiError(response.status, error.code || "HTTP_" + response.status,
        error.message || response.statusText);
    }
    return data;
  }

  async function get(path, query) {
    const target = new URL(url(path));
    for (const [key, value] of Object.entries(query || {})) {
      if (value !== null && value !== undefined && value !== "") target.searchParams.set(key, value);
    }
    const response = await fetch(target.href, {
      headers: { Accept: "application/json" },
      credentials: "same-origin",
      cache: "no-store",
    });
    return decode(response);
  }

  let sessionPromise = null;
  function session() {
    if (sessionPromise === null) {
      sessionPromise = get("/api/v1/session").catch((error) => {
        sessionPromise = null;
        throw error;
      });
    }
    return sessionPromise;
  }

  // Every POST carries the session's CSRF token; the server also checks Origin.
  async function post(path, body) {
    const { csrf_token: token } = await session();
    const response = await fetch(url(path), {
      method: "POST",
      headers: {
        Accept: "application/json",
        "Content-Type": "application/json",
        "X-CSRF-Token": token,
      },
      credentials: "same-origin",
      body: JSON.stringify(body),
    });
    return decode(response);
  }

  // el("td", {class: "num", title: "…"}, "text", childNode): text is always a text
  // node, so nothing from the API is ever interpreted as markup.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // A table's rows; with an `empty` note, the note instead of an empty table.
  function fill(tbody, rows, empty) {
    tbody.replaceChildren(...rows);
    if (empty) {
      empty.hidden = rows.length > 0;
      tbody.closest("table").hidden = rows.length === 0;
    }
  }

  // Sets an element's text and its raw value (data-value), which scripts and tests read.
  function show(id, text, value) {
    const node = document.getElementById(id);
    if (!node) return;
    node.textContent = text;
    node.dataset.value = value === null || value === undefined ? "" : String(value);
  }

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    let value = Number(n);
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return (unit === 0 ? String(value) : value.toFixed(value < 10 ? 2 : 1)) + " " + UNITS[unit];
  }

  function percent(ratio) {
    return ratio === null || ratio === undefined ? "–" : (ratio * 100).toFixed(1) + " %";
  }

  function timestamp(t) {
    return t === null || t === undefined ? "–" : new Date(t * 1000).toLocaleString();
  }

  function ago(t) {
    if (t === null || t === undefined) return "never";
    const seconds = Math.max(0, Date.now() / 1000 - t);
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h ago";
    return (seconds / 86400).toFixed(1) + " d ago";
  }

  // A time cell: relative text, the exact time on hover.
  function when(t) {
    return el("time", { datetime: t ? new Date(t * 1000).toISOString() : null, title: timestamp(t) }, ago(t));
  }

  function shortDigest(digest) {
    return digest ? digest.replace(/^sha256:/, "").slice(0, 12) : "–";
  }

  function digestCell(digest) {
    return el("code", { title: digest, class: "digest" }, shortDigest(digest));
  }

  let flashTimer = null;
  function flash(message, kind) {
    const node = document.getElementById("flash");
    node.textContent = message;
    node.className = "flash " + (kind || "info");
    node.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { node.hidden = true; }, 8000);
  }

  function describe(error) {
    return error instanceof ApiError ? `${error.message} (${error.status} ${error.code})` : String(error);
  }

  // The signed-in user in the header; admin-only controls shown to admins alone.
  async function showSession() {
    const badge = document.getElementById("session");
    try {
      const current = await session();
      badge.textContent = (current.user || "anonymous") + (current.admin ? " · admin" : "");
      document.getElementById("sign-in").hidden = current.user !== null;
      for (const node of document.querySelectorAll(".admin-only")) node.hidden = !current.admin;
      return current;
    } catch (error) {
      badge.textContent = "not signed in";
      flash("Cannot read the session: " + describe(error), "error");
      return { user: null, admin: false, csrf_token: "" };
    }
  }

  return { ApiError, get, post, session, showSession, el, fill, show, bytes, percent, timestamp, ago, when, shortDigest, digestCell, flash, describe };
})();

window.Console = Console;
document.addEventListener("DOMContentLoaded", () => {
  Console.ready = Console.showSession();
});
