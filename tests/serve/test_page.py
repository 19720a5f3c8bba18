"""The page as a clinician's browser sees it: the same recommendations as the service, errors in
plain words with the entered values kept, one audit row per action, and a sign-in once a token exists."""

from __future__ import annotations

import io
import re
from typing import Any

import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient

from dosewise.data.schema import FEATURE_UNITS, PHYSIOLOGICAL_BOUNDS
from dosewise.serve import page
from dosewise.serve.app import TOKEN_COOKIE, create_app
from dosewise.serve.page import STATIC_DIR, page_router
from dosewise.serve.plots import svg_markup
from dosewise.serve.service import Service
from tests.serve.fixtures import STATE

AUTH_OFF = "Authentication is off: no token is configured, so this server only listens on this computer (loopback)"
VANCOMYCIN = "/recommend/vancomycin"
ANESTHESIA = "/recommend/anesthesia"


def page_app(service: Service, store) -> FastAPI:
    """The service's app with the page, as create_app includes it."""
    app = create_app(service, store)
    if not any(getattr(route, "name", None) == "page" for route in app.routes):
        app.include_router(page_router())
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@pytest.fixture()
def service(loaded_models) -> Service:
    return Service(loaded_models)


@pytest.fixture()
def page_client(service, store, loaded_models):
    with TestClient(page_app(service, store)) as client:
        yield Checked(client, loaded_models)


class Checked:
    """A TestClient whose every answer is checked for what a page must never show."""

    def __init__(self, client: TestClient, loaded_models):
        self.client = client
        self.secrets = [str(model.run) for model in loaded_models.values()] + [str(model.run.parent) for model in loaded_models.values()]

    def request(self, method: str, url: str, **kwargs):
        response = self.client.request(method, url, **kwargs)
        assert "Traceback" not in response.text
        for secret in self.secrets:
            assert secret not in response.text, f"{url} shows a path on the server"
        return response

    def get(self, url: str, **kwargs):
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs):
        return self.request("POST", url, **kwargs)

    @property
    def cookies(self):
        return self.client.cookies


def vancomycin_form(**changes: str) -> dict[str, str]:
    return {"model": "iql", **{name: f"{value:g}" for name, value in STATE.items()}, **changes}


def history_csv(rows: list[dict[str, Any]]) -> str:
    return pd.DataFrame(rows).to_csv(index=False)


def rendered_rates(html: str) -> tuple[int, int]:
    found = {drug: int(rate) for drug, rate in re.findall(r'id="rate-(propofol|remifentanil)" data-rate-ml-h="(\d+)"', html)}
    return found["propofol"], found["remifentanil"]


def input_tag(html: str, name: str) -> str:
    match = re.search(rf'<input type="number" id="f-{name}"[^>]*>', html, re.DOTALL)
    assert match is not None, f"no input for {name}"
    return match.group(0)


def test_the_page_lists_the_models_and_says_auth_is_off(page_client, loaded_models):
    response = page_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    for model_id in ("iql", "planner"):
        assert f'<option value="{model_id}"' in html
    assert AUTH_OFF in html
    assert 'action="http://testserver/recommend/vancomycin#result"' in html  # the first model is the default
    for name in loaded_models["iql"].features:
        tag = input_tag(html, name)
        low, high = PHYSIOLOGICAL_BOUNDS[name]
        assert f' min="{low:g}"' in tag and f' max="{high:g}"' in tag and 'step="any"' in tag and " required" in tag
        assert f"({FEATURE_UNITS[name]})" in html
    assert 'name="allow_out_of_range"' in html
    stylesheet = re.search(r'<link rel="stylesheet" href="([^"]+)"', html).group(1)
    css = page_client.get(stylesheet)
    assert css.status_code == 200 and "text/css" in css.headers["content-type"] and "@media (min-width: 800px)" in css.text


def test_the_anesthesia_form_offers_paste_upload_and_the_runs_default_mode(page_client, loaded_models):
    html = page_client.get("/?model=planner").text
    assert 'enctype="multipart/form-data"' in html and 'name="history"' in html and 'type="file" id="upload" name="upload"' in html
    assert "case_id,time,BIS,MAP,SBP,DBP,HR,PPF20_RATE,RFTN20_RATE,age,sex,height,weight,asa" in html
    default = loaded_models["planner"].config["closed_loop"]["default_mode"]
    assert re.search(rf'<option value="{default}" selected>', html)
    assert [m for m in re.findall(r'<option value="(\w+)"', html) if m in ("argmax", "beam", "mcts", "mpc")] == [
        "argmax",
        "beam",
        "mcts",
        "mpc",
    ]


def test_an_unknown_model_says_so_and_shows_another(page_client):
    response = page_client.get("/?model=nonesuch")
    assert response.status_code == 404
    assert "No model named &#39;nonesuch&#39; is loaded" in response.text
    assert 'id="vancomycin-form"' in response.text


def test_the_vancomycin_form_recommends_what_the_service_does_and_audits_it(page_client, service, store):
    _, expected = service.recommend_vancomycin("iql", STATE)
    form = vancomycin_form()
    response = page_client.post(VANCOMYCIN, data=form)
    assert response.status_code == 200, response.text
    html = response.text
    action = expected["policy_action"]
    words = "Keep the dose" if abs(action) < 0.1 else ("Raise the dose" if action > 0 else "Lower the dose")
    assert f'<p class="verdict-words" id="verdict-words">{words}</p>' in html
    assert f'<strong id="policy-action">{action:+.2f}</strong>' in html
    assert float(re.search(r'data-policy-action="([^"]+)"', html).group(1)) == pytest.approx(action, abs=1e-6)
    assert f'<dd id="greedy-action">{expected["greedy_action"]:+.2f}</dd>' in html
    if expected["members"] > 1:
        assert f"± {expected['policy_action_sd']:.2f}" in html
    svg = re.search(r"<svg\b[^>]*>", html).group(0)
    assert 'width="100%"' in svg and "viewBox=" in svg and 'role="img"' in svg
    assert '<title id="q-curve-title">' in html and '<desc id="q-curve-desc">' in html
    for warning in expected["warnings"]:
        assert warning.replace("'", "&#39;") in html
    for name in STATE:  # the entered values stay in the form
        assert f'value="{STATE[name]:g}"' in input_tag(html, name)

    assert store.count_audit() == 1
    (entry,) = store.audit()
    assert entry.endpoint == VANCOMYCIN and entry.method == "POST" and entry.status == 200
    assert entry.model_id == "iql" and entry.request == form and entry.token_name is None
    assert entry.response["policy_action"] == pytest.approx(action) and entry.response["model"] == "iql"
    assert f'Recorded as audit row <strong id="audit-id">{entry.id}</strong>' in html
    assert response.headers["x-audit-id"] == str(entry.id)
    # the audit history below the form lists the row with its answer in words
    assert f"{words}: {expected['dose_mg']:,.0f} mg (policy action {action:+.2f})" in html
    # the dose in mg, from the state's current dose; no prediction without the patient's history
    every = f"{expected['dose_mg']:,.0f} mg every {expected['interval_h']:g} h"
    assert f'<strong id="dose-mg">{every}</strong>' in html
    assert 'id="predicted-auc24"' not in html


def test_an_ensembles_spread_is_shown_next_to_the_action(page_client, service, monkeypatch):
    model, answer = service.recommend_vancomycin("iql", STATE)
    spread = {
        **answer,
        "policy_action": -0.42,
        "members": 5,
        "policy_action_sd": 0.0625,
        "member_actions": [-0.5, -0.45, -0.42, -0.4, -0.33],
    }
    monkeypatch.setattr(service, "recommend_vancomycin", lambda *args: (model, spread))
    html = page_client.post(VANCOMYCIN, data=vancomycin_form()).text
    assert '<p class="verdict-words" id="verdict-words">Lower the dose</p>' in html
    assert '<strong id="policy-action">-0.42</strong> <span id="policy-action-sd">± 0.06</span>' in html
    assert "spread over 5 ensemble models" in html
    assert 'style="left: 29.0%"' in html  # the gauge's mark: -0.42 on the -1..+1 bar


@pytest.mark.parametrize(
    ("action", "words"), [(0.0999, "Keep the dose"), (-0.0999, "Keep the dose"), (0.1, "Raise the dose"), (-0.1, "Lower the dose")]
)
def test_the_words_of_an_action(action, words):
    assert page.dose_verdict(action) == words


def test_an_out_of_range_value_is_refused_in_plain_words_with_the_values_kept(page_client, store):
    form = vancomycin_form(temperature="381")
    response = page_client.post(VANCOMYCIN, data=form)
    assert response.status_code == 422
    html = response.text
    error = re.search(r'<div class="error-box" role="alert" id="form-error">(.*?)</div>', html, re.DOTALL).group(1)
    assert "temperature = 381 is above the maximum 45" in error
    tag = input_tag(html, "temperature")
    assert 'value="381"' in tag and 'aria-invalid="true"' in tag
    assert 'aria-invalid="true"' not in input_tag(html, "creatinine")
    assert 'value="1.1"' in input_tag(html, "creatinine")
    assert 'id="verdict"' not in html
    (entry,) = store.audit()
    assert entry.status == 422 and entry.request == form
    assert entry.response["detail"][0]["loc"] == ["body", "state"] and "temperature" in entry.response["detail"][0]["msg"]


def test_the_override_recommends_and_lists_the_value_kept(page_client, service):
    _, expected = service.recommend_vancomycin("iql", {**STATE, "temperature": 46.0}, allow_out_of_range=True)
    response = page_client.post(VANCOMYCIN, data=vancomycin_form(temperature="46", allow_out_of_range="on"))
    assert response.status_code == 200
    assert f'<strong id="policy-action">{expected["policy_action"]:+.2f}</strong>' in response.text
    assert "temperature = 46 is above the maximum 45" in response.text
    assert 'id="allow-out-of-range" checked' in response.text
    assert ' max="45"' not in input_tag(response.text, "temperature")  # ticked: the browser lets it through


def test_a_missing_or_non_numeric_value_names_the_feature(page_client):
    form = vancomycin_form(creatinine="1,1")
    response = page_client.post(VANCOMYCIN, data=form)
    assert response.status_code == 422
    assert "feature &#39;creatinine&#39;: &#39;1,1&#39; is not a number" in response.text
    del form["bun"]
    response = page_client.post(VANCOMYCIN, data=form)
    assert response.status_code == 422 and "missing feature(s) &#39;bun&#39;" in response.text


def check_anesthesia_answer(response, expected: dict[str, Any]) -> None:
    assert response.status_code == 200, response.text
    html = response.text
    assert rendered_rates(html) == (expected["propofol_rate_ml_h"], expected["remifentanil_rate_ml_h"])
    assert f"{expected['propofol_mg_kg_h']:.2f} mg/kg/h" in html
    assert f"{expected['remifentanil_ug_kg_min']:.3f} µg/kg/min" in html
    for drug in ("propofol", "remifentanil"):
        assert f"{expected['current_rate_ml_h'][drug]} mL/h<br>" in html
    assert "<svg" in html and 'id="bis-map"' in html and '<title id="bis-map-title">Predicted BIS and MAP</title>' in html
    assert f'<dd id="value-plan">{expected["value"]["plan"]:.3f}</dd>' in html
    assert f'<dd id="value-keep">{expected["value"]["keep_current"]:.3f}</dd>' in html


def test_a_pasted_history_gets_the_services_rates_and_plot(page_client, service, store, history_rows):
    _, expected = service.recommend_anesthesia("planner", history_rows)
    text = history_csv(history_rows)
    response = page_client.post(
        ANESTHESIA, data={"model": "planner", "history": text, "mode": ""}, files={"upload": ("", b"", "application/octet-stream")}
    )
    check_anesthesia_answer(response, expected)
    (entry,) = store.audit()
    assert entry.status == 200 and entry.model_id == "planner"
    assert entry.request["history"]["source"] == "pasted" and entry.request["history"]["rows"] == len(history_rows)
    assert entry.response["propofol_rate_ml_h"] == expected["propofol_rate_ml_h"]
    assert f"propofol {expected['propofol_rate_ml_h']} mL/h, remifentanil {expected['remifentanil_rate_ml_h']} mL/h" in response.text


def test_a_tab_separated_paste_from_a_spreadsheet_is_read_too(page_client, service, history_rows):
    _, expected = service.recommend_anesthesia("planner", history_rows)
    text = pd.DataFrame(history_rows).to_csv(index=False, sep="\t")
    check_anesthesia_answer(page_client.post(ANESTHESIA, data={"model": "planner", "history": text}), expected)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_uploaded_history_gets_the_services_rates(page_client, service, store, history_rows, suffix):
    _, expected = service.recommend_anesthesia("planner", history_rows, mode="mpc")
    frame = pd.DataFrame(history_rows)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False) if suffix == ".parquet" else buffer.write(frame.to_csv(index=False).encode())
    content = buffer.getvalue()
    response = page_client.post(
        ANESTHESIA, data={"model": "planner", "mode": "mpc"}, files={"upload": (f"case{suffix}", content, "application/octet-stream")}
    )
    check_anesthesia_answer(response, expected)
    (entry,) = store.audit()
    described = entry.request["history"]
    assert described["source"] == "upload" and described["file_name"] == f"case{suffix}"
    assert described["bytes"] == len(content) and described["rows"] == len(history_rows) and len(described["sha256"]) == 64
    assert entry.request["mode"] == "mpc" and "data" not in described


def test_a_bad_history_row_is_shown_in_plain_words_with_the_text_kept(page_client, store, history_rows):
    rows = [dict(row) for row in history_rows]
    rows[2]["BIS"] = "high"
    text = history_csv(rows)
    response = page_client.post(ANESTHESIA, data={"model": "planner", "history": text})
    assert response.status_code == 422
    error = re.search(r'id="form-error">(.*?)</div>', response.text, re.DOTALL).group(1)
    assert "row 3" in error and "BIS" in error and "high" in error
    assert text.splitlines()[3] in response.text  # the pasted text is still in the box
    (entry,) = store.audit()
    assert entry.status == 422 and entry.response["detail"][0]["loc"] == ["body", "rows"]


@pytest.mark.parametrize(
    ("data", "files", "status", "message"),
    [
        ({"history": ""}, None, 422, "No case history was given"),
        (
            {"history": "case_id,time\n1,0\n"},
            {"upload": ("case.csv", b"case_id,time\n1,0\n", "text/csv")},
            422,
            "Both a file and pasted text",
        ),
        ({}, {"upload": ("case.xlsx", b"PK\x03\x04", "application/octet-stream")}, 422, "is not a .csv or .parquet file"),
        ({}, {"upload": ("case.parquet", b"not parquet", "application/octet-stream")}, 422, "cannot be read as Parquet"),
        ({}, {"upload": ("case.csv", b"\xff\xfe\x00bad", "text/csv")}, 422, "is not UTF-8 text"),
        ({"history": "x", "max_propofol": "250"}, None, 422, "max_propofol: &#39;250&#39; is not a rate the pumps take"),
    ],
)
def test_an_unusable_history_is_refused_in_plain_words(page_client, store, data, files, status, message):
    response = page_client.post(ANESTHESIA, data={"model": "planner", **data}, files=files)
    assert response.status_code == status
    assert message in re.search(r'id="form-error">(.*?)</div>', response.text, re.DOTALL).group(1)
    (entry,) = store.audit()
    assert entry.status == status and "detail" in entry.response


def test_a_history_over_the_size_limit_is_refused_with_its_limit(page_client, store, history_rows, monkeypatch):
    monkeypatch.setattr(page, "MAX_HISTORY_BYTES", 2**20)
    content = b"case_id,time\n" + b"1,0\n" * (2**20 // 4)
    response = page_client.post(ANESTHESIA, data={"model": "planner"}, files={"upload": ("big.csv", content, "text/csv")})
    assert response.status_code == 413
    assert "larger than 1 MiB" in response.text
    (entry,) = store.audit()
    assert entry.status == 413 and entry.request["history"]["file_name"] == "big.csv"


def test_the_audit_history_filters_by_the_selected_model(page_client, history_rows):
    page_client.post(VANCOMYCIN, data=vancomycin_form())
    page_client.post(ANESTHESIA, data={"model": "planner", "history": history_csv(history_rows)})
    everything = page_client.get("/?model=iql").text
    assert everything.count('<td class="nowrap" data-label="Time (UTC)">') == 2 and "The latest 2 of 2 requests" in everything
    only = page_client.get("/?model=iql&audit=model").text
    assert only.count('<td class="nowrap" data-label="Time (UTC)">') == 1 and "The latest 1 of 1 requests to iql" in only
    assert f"{VANCOMYCIN}</code>" in only and f"{ANESTHESIA}</code>" not in only


def test_with_a_token_the_page_asks_to_sign_in_and_audits_the_name(page_client, store):
    token = store.create_token("alice")
    signin = page_client.get("/")
    assert signin.status_code == 200
    assert 'action="http://testserver/signin"' in signin.text and 'type="password"' in signin.text
    assert AUTH_OFF not in signin.text and 'option value="iql"' not in signin.text  # nothing but the form

    refused = page_client.post(VANCOMYCIN, data=vancomycin_form())
    assert refused.status_code == 401 and "Sign in to ask for a recommendation" in refused.text
    assert 'id="verdict"' not in refused.text
    (entry,) = store.audit()
    assert entry.status == 401 and entry.token_name is None
    assert page_client.post(ANESTHESIA, data={"model": "planner", "history": "x"}).status_code == 401

    wrong = page_client.post("/signin", data={"token": token + "x"}, follow_redirects=False)
    assert wrong.status_code == 401 and "That token is not valid" in wrong.text and "set-cookie" not in wrong.headers

    right = page_client.post("/signin", data={"token": token}, follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == "http://testserver/"
    cookie = right.headers["set-cookie"]
    assert cookie.startswith(f"{TOKEN_COOKIE}={token};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Secure" not in cookie
    assert page_client.cookies.get(TOKEN_COOKIE) == token

    signed_in = page_client.get("/")
    assert signed_in.status_code == 200 and '<strong id="token-name">alice</strong>' in signed_in.text and AUTH_OFF not in signed_in.text
    answered = page_client.post(VANCOMYCIN, data=vancomycin_form())
    assert answered.status_code == 200 and 'id="verdict"' in answered.text
    assert store.audit(limit=1)[0].token_name == "alice"
    assert store.count_audit(token_name="alice") == 1

    out = page_client.post("/signout", follow_redirects=False)
    assert out.status_code == 303 and f'{TOKEN_COOKIE}=""' in out.headers["set-cookie"] and "Max-Age=0" in out.headers["set-cookie"]
    assert TOKEN_COOKIE not in page_client.cookies
    assert 'type="password"' in page_client.get("/").text


def test_a_bearer_token_works_too_and_a_revoked_one_does_not(page_client, store):
    token = store.create_token("bob")
    headers = {"Authorization": f"Bearer {token}"}
    assert page_client.post(VANCOMYCIN, data=vancomycin_form(), headers=headers).status_code == 200
    store.revoke_token("bob")
    store.create_token("carol")
    assert page_client.post(VANCOMYCIN, data=vancomycin_form(), headers=headers).status_code == 401


def test_a_form_sent_from_another_site_is_refused(page_client, store):
    response = page_client.post(VANCOMYCIN, data=vancomycin_form(), headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403 and "sent from another web site" in response.text
    (entry,) = store.audit()
    assert entry.status == 403
    assert page_client.post(VANCOMYCIN, data=vancomycin_form(), headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200


def test_the_page_routes_stay_out_of_the_api_schema(page_client):
    paths = page_client.get("/openapi.json").json()["paths"]
    assert not {"/", "/signin", "/signout", VANCOMYCIN, ANESTHESIA} & set(paths)


def test_plots_are_drawn_from_several_threads_at_once(service, history_rows):
    from concurrent.futures import ThreadPoolExecutor

    from dosewise.serve.plots import anesthesia_svg, q_curve_svg

    _, vancomycin = service.recommend_vancomycin("iql", STATE)
    _, anesthesia = service.recommend_anesthesia("planner", history_rows)
    jobs = [(q_curve_svg, vancomycin), (anesthesia_svg, anesthesia)] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        drawn = list(pool.map(lambda job: str(job[0](job[1])), jobs))
    for (plot, _), svg in zip(jobs, drawn):
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and 'width="100%"' in svg
        assert ("q-curve" if plot is q_curve_svg else "bis-map") in svg


def test_svg_markup_scales_and_escapes_its_text():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 3))
    figure.add_subplot().plot([0, 1], [0, 1])
    svg = str(svg_markup(figure, "p", "a <title>", 'values "quoted" & <b>'))
    assert svg.startswith("<svg") and "<?xml" not in svg and "<!DOCTYPE" not in svg
    opening = re.match(r"<svg\b[^>]*>", svg).group(0)
    assert 'width="100%"' in opening and "viewBox=" in opening and "height=" not in opening
    assert '<title id="p-title">a &lt;title&gt;</title>' in svg and "&amp; &lt;b&gt;" in svg
