// Live refresh of the worklist: fetch the rows every 10 s and swap them in (no reload, no framework).
(function () {
  const table = document.querySelector("table[data-refresh]");
  if (!table) return;
  const body = table.querySelector("tbody");
  async function refresh() {
    try {
      const r = await fetch(table.dataset.refresh, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (r.redirected || r.status === 401) { window.location = "/login"; return; }
      if (r.ok) body.innerHTML = await r.text();
    } catch (e) { /* the node may be restarting: try again next time */ }
  }
  setInterval(refresh, 10000);
})();
