"""Open rendered pages in headless Chromium (Debian's `chromium`) at 1280 px and report what a reader would hit:
code blocks that scroll sideways, images that do not load, staging paths, and how many figures a page has."""
import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

CHECK = """<!doctype html><meta charset="utf-8"><pre id="result">running</pre><script>
const PAGES = %s;
function check(url) {
  return new Promise(done => {
    const frame = document.createElement('iframe');
    frame.style.width = '1280px'; frame.style.height = '1000px';
    frame.onload = () => setTimeout(() => {
      const d = frame.contentDocument;
      const code = [...d.querySelectorAll('div.highlight pre')];
      const images = [...d.querySelectorAll('article img')];
      done({url,
            scrolling: code.filter(p => p.scrollWidth > p.clientWidth + 1).map(p => p.textContent.slice(0, 60)),
            broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
            figures: d.querySelectorAll('div.cell_output img').length,
            staging: d.body.innerText.includes('.staging')});
      frame.remove();
    }, 1500);
    frame.src = url;
    document.body.appendChild(frame);
  });
}
(async () => {
  const out = [];
  for (const url of PAGES) out.push(await check(url));
  document.getElementById('result').textContent = JSON.stringify(out);
})();
</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def available() -> bool:
    return shutil.which("chromium") is not None


def check_pages(html_root: Path, pages: list[str], profile: Path) -> dict:
    """Page (relative to `html_root`) -> what Chromium saw, served from 127.0.0.1 so the check can read the page."""
    (html_root / "_check.html").write_text(CHECK % json.dumps(["/" + p for p in pages]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(html_root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dom = subprocess.run(["chromium", *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=120000",
                              "--dump-dom", f"http://127.0.0.1:{server.server_port}/_check.html"],
                             capture_output=True, text=True, timeout=300).stdout
    finally:
        server.shutdown()
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert found and found.group(1) != "running", dom[-2000:]
    return {r["url"].lstrip("/"): r for r in json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))}
