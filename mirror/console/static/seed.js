// The seed page: admins send a list of references to fetch (POST /api/v1/seed); every
// viewer follows the jobs, polled while one runs.
"use strict";

(() => {
  const C = window.Console;
  const POLL_MS = 2000;
  let timer = null;

  function jobRow(job) {
    return C.el("tr", { dataset: { job: job.id, state: job.state } },
      C.el("td", {}, C.el("code", {}, job.id)),
      C.el("td", { class: job.state === "failed" ? "bad" : job.state === "done" ? "ok" : null }, job.state),
      C.el("td", {}, C.el("progress", { max: job.total || 1, value: job.done }), ` ${job.done} of ${job.total}`),
      C.el("td", { class: "num" }, C.bytes(job.bytes)),
      C.el("td", {}, job.errors.length ? C.el("ul", { class: "errors" }, ...job.errors.map((e) => C.el("li", {}, e))) : "none"),
    );
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const { jobs } = await C.get("/api/v1/jobs");
      C.fill(document.querySelector("#jobs tbody"), jobs.map(jobRow), document.getElementById("jobs-empty"));
      if (jobs.some((job) => job.state === "running")) timer = setTimeout(refresh, POLL_MS);
    } catch (error) {
      C.flash("Cannot list jobs: " + C.describe(error), "error");
    }
  }

  async function submit(event) {
    event.preventDefault();
    const form = event.target;
    const references = form.references.value.split(/\s+/).filter(Boolean);
    const platforms = form.platforms.value.split(/[\s,]+/).filter(Boolean);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const { job } = await C.post("/api/v1/seed", {
        references,
        platforms: platforms.length ? platforms : null,
        pin: form.pin.checked,
      });
      C.flash(`Seeding ${references.length} references as job ${job}.`, "ok");
      form.references.value = "";
      await refresh();
    } catch (error) {
      C.flash("Seeding was refused: " + C.describe(error), "error");
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    document.getElementById("seed-form").addEventListener("submit", submit);
    const session = await Console.ready;
    document.getElementById("seed-denied").hidden = session.admin;
    await refresh();
  });
})();
