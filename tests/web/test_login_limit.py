"""Guesses at the token are limited per client address: past 10 wrong ones in a minute,
429 with Retry-After and the token is not even compared; the right token from another
address is not held up. The app's LoginLimit is given a clock the test moves."""
import httpx
import pytest

from tests.web.conftest import TOKEN

GUESSER = ("203.0.113.5", 40000)
OTHER = ("198.51.100.7", 40000)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(two_trees):
    """(app, clock): a server with a token whose login limit runs on `clock`."""
    from castlib.web import create_app
    from castlib.web.auth import LoginLimit

    clock = Clock()
    app = create_app(two_trees[0], token=TOKEN, login_limit=LoginLimit(clock=clock))
    yield app, clock
    app.state.catalog.close()


def _client(app, address):
    from fastapi.testclient import TestClient

    return TestClient(app, client=address, follow_redirects=False)


def _login(client, token):
    return client.post("/login", data={"token": token})


def _start(client, token):
    """An API action with a bearer token; the body is refused (422), but only after the
    token was accepted: nothing is started."""
    return client.post("/api/v1/runs", json={}, headers={"Authorization": f"Bearer {token}"})


def _backs_off(r) -> int:
    assert r.status_code == 429, (r.status_code, r.text)
    assert "too many wrong tokens" in r.text and "castlib_session" not in r.cookies
    wait = int(r.headers["Retry-After"])
    assert 1 <= wait <= 60
    return wait


def test_the_login_form_backs_off_after_10_wrong_tokens(limited):
    app, clock = limited
    guesser, other = _client(app, GUESSER), _client(app, OTHER)
    for i in range(10):
        clock.now += 1
        assert _login(guesser, f"guess-{i}").status_code == 401
    assert _backs_off(_login(guesser, "guess-10")) == 51   # the first left the window
    assert _backs_off(_login(guesser, TOKEN))              # not even compared
    r = _login(other, TOKEN)                               # another address: at once
    assert r.status_code == 303 and r.cookies["castlib_session"]
    # a logged-in browser behind the guesser's address still acts: the cookie is no guess
    browser = _client(app, GUESSER)
    browser.cookies.set("castlib_session", r.cookies["castlib_session"])
    assert "actions allowed" in browser.get("/actions").text
    clock.now += 51                                        # the window has passed
    r = _login(guesser, TOKEN)
    assert r.status_code == 303 and r.cookies["castlib_session"]


def test_the_bearer_token_backs_off_after_10_wrong_ones(limited):
    app, clock = limited
    guesser, other = _client(app, GUESSER), _client(app, OTHER)
    for i in range(10):
        assert _start(guesser, f"guess-{i}").status_code == 401
    r = _start(guesser, "guess-10")
    assert _backs_off(r) == 60 and r.json()["error"].startswith("too many wrong tokens")
    assert _backs_off(_start(guesser, TOKEN))
    assert _start(other, TOKEN).status_code == 422         # accepted, then the body refused
    # a page asks whether a request may act: no guess there either, nor a count twice
    assert "actions allowed" not in guesser.get(
        "/actions", headers={"Authorization": f"Bearer {TOKEN}"}).text
    clock.now += 59
    assert _backs_off(_start(guesser, TOKEN)) == 1
    clock.now += 1
    assert _start(guesser, TOKEN).status_code == 422
    # the old failures are forgotten: 10 new guesses, and the 11th waits again
    for i in range(10):
        assert _start(guesser, f"again-{i}").status_code == 401
    assert _backs_off(_start(guesser, "again-10")) == 60


def test_form_and_bearer_guesses_count_together(limited):
    app, _ = limited
    guesser = _client(app, GUESSER)
    for i in range(5):
        assert _login(guesser, f"guess-{i}").status_code == 401
        assert _start(guesser, f"guess-{i}").status_code == 401
    _backs_off(_login(guesser, TOKEN))
    _backs_off(_start(guesser, TOKEN))


def test_an_ipv6_guesser_counts_as_its_64_block(limited):
    """Another address of the same /64 is the same guesser; another /64 is not."""
    app, _ = limited
    for i in range(10):
        assert _start(_client(app, (f"2001:db8::{i + 1:x}", 1)), "guess").status_code == 401
    _backs_off(_start(_client(app, ("2001:db8::ffff:1", 1)), TOKEN))
    assert _start(_client(app, ("2001:db8:0:1::1", 1)), TOKEN).status_code == 422


def test_the_limit_forgets_old_addresses():
    """Bounded memory: an address is kept while its failures are in the window, and no
    more than max_clients at once."""
    from castlib.web.auth import LoginLimit

    clock = Clock()
    limit = LoginLimit(failures=3, window=60, clock=clock, max_clients=100)
    for i in range(500):
        for _ in range(3):
            assert limit.start(f"10.0.{i // 256}.{i % 256}")[0] == 0
    assert len(limit) == 100
    assert limit.retry_after("10.0.0.0") == 0     # the longest quiet went first
    assert limit.retry_after("10.0.1.243") == 60
    for _ in range(3):
        limit.start("192.0.2.1")
    assert limit.retry_after("192.0.2.1") == 60 and limit.start("192.0.2.1") == (60, None)
    clock.now += 61
    limit.start("192.0.2.2")
    assert len(limit) == 1 and limit.retry_after("192.0.2.1") == 0


def test_a_right_token_is_not_counted():
    """start() counts an attempt before the comparison (parallel guesses are not all
    compared before the first is counted); forgive() takes back one that was right."""
    from castlib.web.auth import LoginLimit

    clock = Clock()
    limit = LoginLimit(failures=3, window=60, clock=clock)
    for _ in range(10):
        wait, stamp = limit.start("192.0.2.1")
        assert wait == 0
        limit.forgive("192.0.2.1", stamp)
    assert len(limit) == 0
    limit.start("192.0.2.1")
    clock.now += 1
    wait, stamp = limit.start("192.0.2.1")
    limit.forgive("192.0.2.1", stamp)
    limit.start("192.0.2.1")
    assert limit.retry_after("192.0.2.1") == 0    # two failures of three
    limit.start("192.0.2.1")
    assert limit.retry_after("192.0.2.1") == 59


def test_a_real_server_counts_the_connecting_address(tmp_path, web_server, two_trees):
    """`castlib web` does not take the client's address from X-Forwarded-For: a local
    process naming a new address with each guess is still one guesser."""
    base = web_server(two_trees[0], token=TOKEN)
    with httpx.Client(base_url=base, timeout=60) as http:
        for i in range(10):
            r = http.post("/api/v1/runs", json={}, headers={
                "Authorization": f"Bearer guess-{i}", "X-Forwarded-For": f"192.0.2.{i + 1}"})
            assert r.status_code == 401, r.text
        r = http.post("/api/v1/runs", json={}, headers={
            "Authorization": f"Bearer {TOKEN}", "X-Forwarded-For": "192.0.2.99"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0, r.text


def test_guesses_sent_side_by_side_are_still_10(tmp_path, web_server, two_trees):
    """The login form runs in the server's thread pool: 30 wrong tokens sent at once get
    10 comparisons (401) and 20 refusals (429), not 30 comparisons before the first
    failure is counted."""
    from concurrent.futures import ThreadPoolExecutor

    base = web_server(two_trees[0], token=TOKEN)
    with httpx.Client(base_url=base, timeout=60,
                      limits=httpx.Limits(max_connections=30)) as http:
        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(lambda i: http.post("/login", data={"token": f"g{i}"})
                                  .status_code, range(30)))
        assert sorted(codes) == [401] * 10 + [429] * 20, codes
        r = http.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
