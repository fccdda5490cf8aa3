"""The console in a real browser (Debian's Chromium, headless, driven by Playwright) against a
real engine (started with --allow-private-postback-targets): sign in, see postbacks live,
search by a partial value, filter by response status, open a postback's parameters, its error
and why it got it, page through, export CSV and compare it with the API, see the chart and
integration health; see a failed affiliate postback and re-send it; create an advertiser, an
offer, a partner and a postback setting through the setup pages and follow the tracking link;
hostile parameters and an affiliate's hostile response body show as text.

    python console_test.py BASE_URL API_KEY [SCREENSHOT_DIR]

Prints each check; exits non-zero on the first failure (an assertion). With SCREENSHOT_DIR,
writes a screenshot of each page there.
"""
import csv
import http.server
import os
import json
from datetime import date
import sys
import threading
import urllib.parse
import urllib.request

from playwright.sync_api import expect, sync_playwright

BASE, KEY = sys.argv[1].rstrip("/"), sys.argv[2]
# Where a screenshot of each page goes (the README shows copies of them in docs/console/).
SHOTS = sys.argv[3] if len(sys.argv) > 3 else None


def shot(page, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=False)
SCRIPT = "<script>window.__pwned = 1</script>"
IMG = '<img src=x onerror="window.__pwned = 2">'


def call(method, path, form=None, key=True):
    data = urllib.parse.urlencode(form).encode() if form else None
    req = urllib.request.Request(BASE + path, data=data, method=method)
    if key:
        req.add_header("API-Key", KEY)
    with urllib.request.urlopen(req) as r:
        return r.status, r.headers, r.read()


AFFILIATE_BODY = "<script>window.__pwned = 3</script>"


class Affiliate(http.server.BaseHTTPRequestHandler):
    """An affiliate's server that refuses every postback, with a hostile body."""

    hits = 0

    def do_GET(self):
        Affiliate.hits += 1
        body = AFFILIATE_BODY.encode()
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def affiliate():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Affiliate)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def seed():
    """An offer, a partner with a postback setting to a refusing affiliate, two clicks;
    accepted, rejected and hostile postbacks."""
    call("POST", "/3.0/admin/offer", {"title": "Shop", "url": "https://shop.example/?c={clickid}"})
    call("POST", "/3.0/admin/partner", {"email": "a@example.com"})
    call("POST", "/3.0/partner/postback", {"partner_id": "1", "url": affiliate() + "/pb?t={transactionid}"})
    clicks = []
    for _ in range(2):
        req = urllib.request.Request(BASE + "/click?offer_id=1&pid=1")
        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(req)
        except urllib.error.HTTPError as e:
            clicks.append(e.headers["Location"].split("c=")[1][:24])
    postbacks = [f"clickid={clicks[0]}&action_id=ORDER-777&sum=10"]
    # The same order again, on the other click: a duplicate.
    postbacks.append(f"clickid={clicks[1]}&action_id=ORDER-777&sum=10")
    postbacks += [f"clickid={clicks[1]}&action_id=A{i}&goal=nope" for i in range(60)]
    postbacks.append("clickid=" + urllib.parse.quote(SCRIPT) + "&note=" + urllib.parse.quote(IMG))
    for q in postbacks:
        status, _, _ = call("GET", "/postback?" + q, key=False)
        assert status == 200, q
    return len(postbacks)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def wait_processed(n):
    import time
    from datetime import date

    d = date.today().isoformat()
    for _ in range(300):
        _, _, body = call("GET", f"/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&limit=1")
        if json.loads(body)["pagination"]["total_count"] >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{n} postbacks were not processed")


def main():
    n = seed()
    wait_processed(n)
    _, headers, _ = call("GET", "/", key=False)
    assert "script-src 'self'" in headers["Content-Security-Policy"], headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    print("ok  the console page carries a Content-Security-Policy and nosniff")

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(BASE + "/")

        # Nothing without the key; a wrong key is refused.
        expect(page.locator("#postbacks")).to_be_hidden()
        page.fill("#api-key", "wrong")
        page.click("#sign-in-form button")
        expect(page.locator("#sign-in-error")).to_have_text("That key is not valid.")
        print("ok  a wrong key is refused and nothing is shown")

        page.fill("#api-key", KEY)
        page.click("#sign-in-form button")
        expect(page.locator("#summary")).to_contain_text(f"{n} postbacks")
        assert KEY not in page.url
        print(f"ok  signed in: {n} postbacks listed; the key is not in the URL")

        # Live mode: a postback sent now appears at the top without a reload.
        page.click("#live")
        expect(page.locator("#live")).to_have_attribute("aria-pressed", "true")
        # Once following, the stream has marked what was there; what comes now is news.
        expect(page.locator("#live")).to_have_attribute("data-state", "following")
        status, _, _ = call("GET", "/postback?clickid=nope&action_id=LIVE-1", key=False)
        assert status == 200
        expect(page.locator("#rows tbody tr").first).to_contain_text("LIVE-1", timeout=15000)
        n += 1
        expect(page.locator("#summary")).to_contain_text(f"{n} postbacks")
        page.click("#live")
        expect(page.locator("#live")).to_have_attribute("aria-pressed", "false")
        print("ok  live mode shows a new postback at the top, without a reload")

        # Search by a partial parameter value.
        page.fill("input[name=search]", "order-77")
        page.click("#filters button")
        expect(page.locator("#summary")).to_contain_text("2 postbacks")
        expect(page.locator("#rows tbody tr")).to_have_count(2)
        expect(page.locator("#rows tbody tr td.params").first).to_contain_text("action_id=ORDER-777")
        print("ok  search by a partial value finds the order and its duplicate")

        # Why the duplicate was refused: the rules it passed, and the conversion that existed,
        # which opens in the Conversions tab.
        page.locator("#rows tbody tr", has_text="Conversion exists").click()
        expect(page.locator("#why li[data-rule=click]")).to_contain_text("clicked at")
        expect(page.locator("#why li[data-rule=dedupe]")).to_have_class("rejected")
        expect(page.locator("#why li[data-rule=dedupe]")).to_contain_text('action id "ORDER-777"')
        page.click("#why li[data-rule=dedupe] button")
        expect(page.locator("#conversions")).to_be_visible()
        expect(page.locator("#conv-rows tbody tr")).to_have_count(1)
        expect(page.locator("#conv-rows tbody tr")).to_contain_text("ORDER-777")
        page.click("#tab-server")
        print("ok  a duplicate's explanation names the conversion that existed and opens it")

        # Filter by response status, then open a rejected one: its exact error.
        page.fill("input[name=search]", "")
        page.select_option("select[name=response_status]", "2")
        page.click("#filters button")
        expect(page.locator("#summary")).to_contain_text(f"{n - 1} postbacks")
        expect(page.locator("#rows tbody td.rejected").first).to_be_visible()
        page.locator("#rows tbody tr", has_text="goal=nope").first.click()
        expect(page.locator("#detail-response")).to_have_text("Rejected (status 2): Goal not found")
        expect(page.locator("#detail-params")).to_contain_text("goal")
        expect(page.locator("#why li")).to_have_count(6)
        shot(page, "postback-why")
        # Why: rule by rule, up to the goal the offer does not pay for, and the ones it does.
        expect(page.locator("#why li")).to_have_count(6)
        expect(page.locator("#why li[data-rule=offer]")).to_have_class("ok")
        expect(page.locator("#why li[data-rule=goal]")).to_have_class("rejected")
        expect(page.locator("#why li[data-rule=goal]")).to_contain_text('goal "nope" is not one the offer pays for; it pays for "1"')
        page.click("#detail button")
        print("ok  filtered by response status; a rejection opens with its exact error and why")

        # Hostile parameters are text, in the table and in the detail.
        page.fill("input[name=search]", "pwned")
        page.click("#filters button")
        expect(page.locator("#rows tbody tr")).to_have_count(1)
        expect(page.locator("#rows tbody td.params")).to_contain_text(SCRIPT)
        page.locator("#rows tbody tr").first.click()
        expect(page.locator("#detail-params")).to_contain_text(IMG)
        assert page.locator("#detail-params img").count() == 0
        assert page.evaluate("window.__pwned") is None and not dialogs
        page.click("#detail button")
        print("ok  <script> and <img onerror> in parameters show as text and never run")

        # The affiliate filter: every postback but the two whose click id matched no click.
        page.fill("input[name=search]", "")
        page.select_option("select[name=response_status]", "")
        page.fill("#filters input[name=partner]", "1")
        page.click("#filters button")
        expect(page.locator("#summary")).to_contain_text(f"{n - 2} postbacks")
        page.fill("#filters input[name=partner]", "")
        print("ok  the affiliate filter")

        # Paging through the whole list, 50 a page.
        page.fill("input[name=search]", "")
        page.select_option("select[name=response_status]", "")
        page.click("#filters button")
        expect(page.locator("#rows tbody tr")).to_have_count(50)
        expect(page.locator("#prev")).to_be_disabled()
        page.click("#next")
        expect(page.locator("#rows tbody tr")).to_have_count(n - 50)
        expect(page.locator("#summary")).to_contain_text(f"showing 51–{n}")
        expect(page.locator("#next")).to_be_disabled()
        page.click("#prev")
        expect(page.locator("#rows tbody tr")).to_have_count(50)
        # Keyboard: "/" goes to the search; arrows move between rows; Enter opens one.
        page.locator("#postbacks h2").click()
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.name") == "search"
        page.locator("#rows tbody tr").first.focus()
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
        expect(page.locator("#detail")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("#detail")).to_be_hidden()
        print("ok  paged through the list and back; the keyboard gets around")

        # CSV export of the filtered rows: the API's rows, in its order.
        with page.expect_download() as info:
            page.click("#export")
        with open(info.value.path(), newline="", encoding="utf-8") as f:
            exported = list(csv.reader(f))
        assert exported[0][:3] == ["id", "date", "offer_id"], exported[0]
        d = date.today().isoformat()
        _, _, body = call("GET", f"/3.0/stats/serverpostbacks?date_from={d}&date_to={d}&limit=500")
        listed = [r["_id"]["$id"] for r in json.loads(body)["postbacks"]]
        assert [r[0] for r in exported[1:]] == listed, (len(exported), len(listed))
        hostile = [r for r in exported if "pwned" in ",".join(r)]
        assert len(hostile) == 1 and hostile[0][12] == "Broken clickid", hostile
        print(f"ok  exported {len(listed)} rows as CSV, the same as the API's")

        # The chart over the range: accepted and rejected postbacks, by hour.
        expect(page.locator("#chart rect.rejected").first).to_be_attached()
        tips = page.locator("#chart title").all_text_contents()
        assert any(t.endswith("rejected") and not t.endswith(" 0 rejected") for t in tips), tips
        shot(page, "server-postbacks")
        print("ok  the chart shows the range's accepted and rejected postbacks")

        # Integration health: the offer whose postbacks are refused stands out, with its error.
        page.click("#tab-health")
        shop = page.locator("#health-rows tbody tr", has_text="Shop")
        expect(shop).to_have_class("alert")
        expect(shop).to_contain_text("Goal not found ×60")
        expect(shop.locator("svg.spark rect.rejected").first).to_be_attached()
        shot(page, "integration-health")
        page.click("#tab-server")
        print("ok  integration health puts the refused offer forward, with its errors")

        # Affiliates Postbacks: the refused delivery, its hostile body as text, and a re-send.
        page.click("#tab-affiliate")
        expect(page.locator("#aff-summary")).to_contain_text("1 attempts", timeout=15000)
        row = page.locator("#aff-rows tbody tr").first
        expect(row).to_contain_text("404")
        expect(row).to_contain_text(AFFILIATE_BODY)
        expect(row).to_contain_text("failed")
        assert page.evaluate("window.__pwned") is None and not dialogs
        assert page.locator("#aff-rows tbody script").count() == 0
        row.locator("button", has_text="Re-send").click()
        expect(page.locator("#aff-message")).to_have_text("Re-sent 1 delivery.")
        for _ in range(100):
            page.click("#aff-filters button[type=submit]")
            page.wait_for_timeout(100)
            if "2 attempts" in page.locator("#aff-summary").inner_text():
                break
        expect(page.locator("#aff-summary")).to_contain_text("2 attempts")
        assert Affiliate.hits == 2, Affiliate.hits
        shot(page, "affiliates-postbacks")
        print("ok  a failed affiliate postback shows its code and body as text, and re-sends once")

        # Conversions: the one accepted postback's, found by its action id and status.
        page.click("#tab-conversions")
        expect(page.locator("#conv-summary")).to_contain_text("1 conversions")
        expect(page.locator("#conv-rows tbody tr").first).to_contain_text("ORDER-777")
        page.select_option("#conv-filters select[name=status]", "3")
        page.click("#conv-filters button[type=submit]")
        expect(page.locator("#conv-summary")).to_contain_text("0 conversions")
        page.select_option("#conv-filters select[name=status]", "")
        page.fill("#conv-filters input[name=action_id]", "ORDER-777")
        page.click("#conv-filters button[type=submit]")
        expect(page.locator("#conv-rows tbody tr")).to_have_count(1)
        shot(page, "conversions")
        print("ok  conversions list with their filters")

        # The test preview of the affiliate's postback setting for that conversion: the URL it
        # would call, with the macros filled, nothing sent.
        conversion_id = page.locator("#conv-rows tbody tr td").nth(1).inner_text()
        hits = Affiliate.hits
        page.click("#tab-affiliate")
        page.fill("#preview input[name=setting]", "1")
        page.fill("#preview input[name=conversion_id]", conversion_id)
        page.click("#preview button")
        expect(page.locator("#preview-url")).to_contain_text("GET http://127.0.0.1:")
        expect(page.locator("#preview-url")).to_contain_text("/pb?t=ORDER-777")
        assert Affiliate.hits == hits, "a preview sends nothing"
        print("ok  the test preview shows the URL a setting would call, and sends nothing")

        # Setup: an advertiser, an offer with a payment, a partner and its postback setting,
        # through the setup pages; then the links to hand out, and the tracking link works.
        page.click("#tab-setup")
        page.fill("#adv-form input[name=title]", "Acme")
        page.fill("#adv-form input[name=secure]", "s3cret")
        page.click("#adv-form button")
        expect(page.locator("#setup-message")).to_contain_text("Created advertiser")
        expect(page.locator("#adv-list tbody")).to_contain_text("Acme")
        assert "s3cret" not in page.locator("#adv-list").inner_text()
        page.fill("#offer-form input[name=title]", "Setup offer")
        page.select_option("#offer-form select[name=advertiser]", label="Acme")
        page.fill("#offer-form input[name=url]", "https://land.example/?c={clickid}")
        page.fill("#offer-form input[name=goal]", "sale")
        page.fill("#offer-form input[name=total]", "2.5")
        page.click("#add-payment")
        second = page.locator("#offer-form fieldset.payment").nth(1)
        second.locator("input[name=goal]").fill("install")
        second.locator("input[name=total]").fill("10")
        second.locator("select[name=type]").select_option("percent")
        page.click("#offer-form button[type=submit]")
        expect(page.locator("#setup-message")).to_contain_text("Created offer 2")
        expect(page.locator("#offer-list tbody")).to_contain_text("sale: 2.5 USD, install: 10%")
        expect(page.locator("#offer-form fieldset.payment")).to_have_count(1)
        page.fill("#partner-form input[name=email]", "setup@example.com")
        page.click("#partner-form button")
        expect(page.locator("#partner-list tbody")).to_contain_text("setup@example.com")
        page.select_option("#setting-form select[name=partner_id]", label="2 · setup@example.com")
        page.fill("#setting-form input[name=url]", "https://aff.example/pb?t={transactionid}")
        page.click("#setting-form button")
        expect(page.locator("#setting-list tbody")).to_contain_text("https://aff.example/pb?t={transactionid}")
        _, _, body = call("GET", "/3.0/offer/2")
        offer = json.loads(body)["offer"]
        assert offer["title"] == "Setup offer" and offer["payments"][0]["goal"] == "sale", offer
        assert offer["payments"][0]["total"] == 2.5, offer
        assert offer["payments"][1]["goal"] == "install" and offer["payments"][1]["type"] == "percent", offer
        page.select_option("#links-form select[name=offer]", label="2 · Setup offer")
        page.select_option("#links-form select[name=partner]", label="2 · setup@example.com")
        link = page.locator("#link-click").inner_text()
        assert link == BASE + "/click?offer_id=2&pid=2", link
        expect(page.locator("#link-postback")).to_contain_text("/postback?clickid={clickid}&action_id={order_id}&goal=sale")
        expect(page.locator("#link-postback")).to_contain_text("secure=s3cret")
        expect(page.locator("#link-pixel")).to_contain_text("afgoal=sale")
        page.click("#links button[data-copy=link-click]")
        expect(page.locator("#links button[data-copy=link-click]")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == link
        try:
            urllib.request.build_opener(NoRedirect).open(link)
            raise AssertionError("the tracking link did not redirect")
        except urllib.error.HTTPError as e:
            assert e.code == 302 and e.headers["Location"].startswith("https://land.example/?c="), e
        shot(page, "setup")
        print("ok  setup pages create an advertiser, an offer, a partner and its postback; the links work")

        page.click("#sign-out")
        expect(page.locator("#sign-in")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
        print("ok  signing out forgets the key")
        browser.close()


if __name__ == "__main__":
    main()
