// The browse page, one view per depth of the query string: no repository, the cached
// repositories (searchable, paged); a repository, its tags; a reference, the manifest
// with its platforms and layers, and for admins the actions on it.
"use strict";

(() => {
  const C = window.Console;
  const params = new URLSearchParams(window.location.search);
  const upstream = params.get("upstream");
  const repository = params.get("repository");
  const reference = params.get("reference");

  const browseLink = (query, text) => C.el("a", { href: "/ui/browse?" + new URLSearchParams(query) }, text);

  function crumbs() {
    const trail = [browseLink({}, "repositories")];
    if (repository) trail.push(browseLink({ upstream, repository }, `${upstream}/${repository}`));
    if (reference) trail.push(C.el("span", {}, reference));
    const nav = document.getElementById("crumbs");
    nav.replaceChildren(...trail.flatMap((node, i) => (i ? [" › ", node] : [node])));
    for (const name of document.querySelectorAll(".repo-name")) name.textContent = `${upstream}/${repository}`;
  }

  async function repositories() {
    const view = document.getElementById("repositories-view");
    view.hidden = false;
    const q = params.get("q") || "";
    document.getElementById("q").value = q;
    const tbody = document.querySelector("#repositories tbody");
    const more = document.getElementById("more");
    let cursor = null;
    const rows = [];
    async function page() {
      const data = await C.get("/api/v1/repositories", { q, limit: 100, cursor });
      for (const r of data.repositories) {
        rows.push(C.el("tr", { dataset: { repository: `${r.upstream}/${r.repository}` } },
          C.el("td", {}, r.upstream),
          C.el("td", {}, browseLink({ upstream: r.upstream, repository: r.repository }, r.repository)),
          C.el("td", { class: "num" }, r.tags),
          C.el("td", {}, C.when(r.last_pulled)),
        ));
      }
      C.fill(tbody, rows, document.getElementById("repositories-empty"));
      cursor = data.next;
      more.hidden = cursor === null;
    }
    more.addEventListener("click", () => page().catch((e) => C.flash(C.describe(e), "error")));
    await page();
  }

  async function tags() {
    document.getElementById("tags-view").hidden = false;
    const data = await C.get("/api/v1/tags", { upstream, repository });
    C.fill(document.querySelector("#tags tbody"), data.tags.map((t) => C.el("tr", { dataset: { tag: t.tag } },
      C.el("td", {}, browseLink({ upstream, repository, reference: t.tag }, t.tag)),
      C.el("td", {}, browseLink({ upstream, repository, reference: t.digest }, C.digestCell(t.digest))),
      C.el("td", {}, C.el("code", {}, t.media_type)),
      C.el("td", {}, C.when(t.checked_at)),
    )), document.getElementById("tags-empty"));
  }

  function pinnedBadge(pinned) {
    return C.el("span", { class: pinned ? "badge pinned" : "badge" }, pinned ? "pinned" : "not pinned");
  }

  function fact(term, ...value) {
    return [C.el("dt", {}, term), C.el("dd", {}, ...value)];
  }

  function platformSection(p) {
    const name = [p.os, p.architecture, p.variant].filter(Boolean).join("/");
    const total = p.layers.reduce((sum, layer) => sum + layer.size, 0);
    return C.el("section", { class: "card platform", dataset: { platform: name, digest: p.digest } },
      C.el("h3", {}, name, " ", pinnedBadge(p.pinned)),
      C.el("p", { class: "muted" }, "manifest ", C.digestCell(p.digest), ` · ${C.bytes(p.size)} · ${p.layers.length} layers, ${C.bytes(total)}`),
      C.el("table", { class: "layers" },
        C.el("thead", {}, C.el("tr", {}, C.el("th", {}, "Layer"), C.el("th", {}, "Media type"), C.el("th", {}, "Size"), C.el("th", {}, "Cached"))),
        C.el("tbody", {}, ...p.layers.map((layer) => C.el("tr", {},
          C.el("td", {}, C.digestCell(layer.digest)),
          C.el("td", {}, C.el("code", {}, layer.media_type)),
          C.el("td", { class: "num", "data-value": layer.size }, C.bytes(layer.size)),
          C.el("td", { class: layer.cached ? "ok" : "muted" }, layer.cached ? "yes" : "no"),
        ))),
      ),
    );
  }

  async function manifest() {
    document.getElementById("manifest-view").hidden = false;
    document.getElementById("manifest-reference").textContent = reference.startsWith("sha256:") ? "@" + C.shortDigest(reference) : ":" + reference;
    const m = await C.get("/api/v1/manifest", { upstream, repository, reference });
    document.getElementById("manifest-view").dataset.pinned = String(m.pinned);
    document.getElementById("manifest-facts").replaceChildren(
      ...fact("Digest", C.el("code", {}, m.digest)),
      ...fact("Media type", C.el("code", {}, m.media_type)),
      ...fact("Size", C.bytes(m.size)),
      ...fact("Pinned", pinnedBadge(m.pinned)),
      ...fact("First pulled", C.when(m.first_pulled)),
      ...fact("Last pulled", C.when(m.last_pulled)),
      ...fact("Platforms", String(m.platforms.length)),
    );
    document.getElementById("platforms").replaceChildren(...m.platforms.map(platformSection));
    document.getElementById("pin").hidden = m.pinned;
    document.getElementById("unpin").hidden = !m.pinned;
    document.getElementById("refresh").hidden = reference.startsWith("sha256:");
  }

  // An action: POST, say what happened, show the manifest as it now is.
  function action(id, path, body, done) {
    const button = document.getElementById(id);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const result = await C.post(path, body());
        C.flash(done(result), "ok");
        if (path !== "/api/v1/evict") await manifest();
      } catch (error) {
        C.flash(`${id} failed: ${C.describe(error)}`, "error");
      } finally {
        button.disabled = false;
      }
    });
  }

  function setupActions() {
    const target = () => ({ upstream, repository, reference });
    action("pin", "/api/v1/pin", target, (r) => `Pinned ${r.digests.length} blobs; eviction spares them.`);
    action("unpin", "/api/v1/unpin", target, (r) => `Unpinned ${r.digests.length} blobs.`);
    action("refresh", "/api/v1/refresh", () => ({ upstream, repository, tag: reference }), (r) => `Tag ${reference} is ${r.digest}.`);
    // Evicting asks twice: the first click arms the button, the second evicts.
    const evict = document.getElementById("evict");
    evict.addEventListener("click", async (event) => {
      if (evict.dataset.armed !== "true") {
        event.stopImmediatePropagation();
        evict.dataset.armed = "true";
        evict.textContent = "Click again to evict";
        return;
      }
      evict.dataset.armed = "false";
      evict.textContent = "Evict";
    });
    action("evict", "/api/v1/evict", target, (r) => `Evicted ${r.digests.length} blobs, ${C.bytes(r.freed)} freed.`);
  }

  document.addEventListener("DOMContentLoaded", async () => {
    try {
      if (upstream && repository && reference) {
        crumbs();
        setupActions();
        await manifest();
      } else if (upstream && repository) {
        crumbs();
        await tags();
      } else {
        await repositories();
      }
    } catch (error) {
      C.flash(C.describe(error), "error");
    }
  });
})();
