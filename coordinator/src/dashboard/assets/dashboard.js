// The dashboard's only script: every two seconds it fetches the panels the coordinator renders
// (dashboard/panels, the same HTML as the page's) and swaps them in. A failed fetch keeps the
// last view and says so: the coordinator stops serving when the job ends.
"use strict";
(function () {
  const PERIOD_MS = 2000;
  const panels = document.getElementById("panels");
  const live = document.getElementById("live");
  let polls = 0;
  async function poll() {
    try {
      const reply = await fetch("dashboard/panels", { cache: "no-store" });
      if (!reply.ok) {
        throw new Error("HTTP " + reply.status);
      }
      panels.innerHTML = await reply.text();
      polls += 1;
      document.body.dataset.polls = String(polls);
      live.textContent = "live · " + new Date().toLocaleTimeString();
      live.className = "live";
    } catch (e) {
      live.textContent = "not updating: the coordinator does not answer (" + e.message + ")";
      live.className = "stale";
    }
    setTimeout(poll, PERIOD_MS);
  }
  poll();
})();
