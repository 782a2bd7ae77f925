// castlib's pages: draws each <canvas data-chart="ID"> from the JSON in <script id="ID">
// (data, not code: the server writes it with Jinja's tojson, which escapes "<").
(function () {
  function human(n) {
    var units = ["B", "kB", "MB", "GB", "TB", "PB"], i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (Math.round(n * 10) / 10) + " " + units[i];
  }
  // Chart.js 3 draws everything grey unless told: one colour a location or series
  var palette = ["#36a2eb", "#ff6384", "#4bc0c0", "#ff9f40", "#9966ff", "#ffcd56", "#8c564b"];
  function colours(n) { var out = []; for (var i = 0; i < n; i++) out.push(palette[i % palette.length]); return out; }
  function day(ms) { return new Date(ms).toISOString().slice(0, 16).replace("T", " "); }
  var kinds = {
    bar_bytes: function (d) {
      return {type: "bar", data: {labels: d.labels, datasets: [{label: "bytes", data: d.data, backgroundColor: colours(d.data.length)}]},
              options: {animation: false, scales: {y: {ticks: {callback: human}}}}};
    },
    bar_count: function (d) {
      return {type: "bar", data: {labels: d.labels, datasets: [{label: "files", data: d.data, backgroundColor: palette[0]}]},
              options: {animation: false}};
    },
    line_time: function (d) {
      d.datasets.forEach(function (ds, i) {
        ds.borderColor = ds.backgroundColor = palette[i % palette.length];
        ds.pointRadius = 4;
      });
      return {type: "line", data: {datasets: d.datasets},
              options: {animation: false, parsing: true,
                        scales: {x: {type: "linear", ticks: {callback: day}},
                                 y: {ticks: {callback: d.unit === "rate" ? function (v) { return human(v) + "/s"; } : human}}}}};
    }
  };
  function draw(root) {
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (window.Chart === undefined || Chart.getChart(canvas)) return;
      var data = JSON.parse(document.getElementById(canvas.dataset.chart).textContent);
      new Chart(canvas, kinds[canvas.dataset.kind](data));
    });
  }
  document.addEventListener("DOMContentLoaded", function () { draw(document); });
  document.addEventListener("htmx:afterSwap", function (e) { draw(e.target); });
})();
