#!/usr/bin/env python3
"""An LTI 1.3 platform for Viva's end-to-end tests.

Independently written tool-facing behaviour comes from the PyPI package
`lti1p3platform` (MIT): launch messages, their signatures, the JWKS, the
client-credentials token endpoint and deep-linking response validation.
PyJWT crafts the malformed and forged tokens of the negative tests.

lti1p3platform checks neither the redirect_uri of an auth request nor the
client assertion's aud, jti and exp; this harness does, and records what it
saw so the Rust tests can assert on it (GET /control/log).

Usage: lti_platform.py [--port 0]. Prints one JSON line {"port": N, "base": URL}
when it is listening. Everything is in memory.
"""

import argparse
import base64
import hashlib
import hmac
import html
import json
import secrets
import sys
import threading
import time
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto.jwk import JWK
from lti1p3platform.ltiplatform import LTI1P3PlatformConfAbstract
from lti1p3platform.message_launch import LTIAdvantageMessageLaunchAbstract
from lti1p3platform.registration import Registration
from lti1p3platform.request import Request

# The 1024-bit key exists to be refused by the tool; no need to hear about it.
warnings.filterwarnings("ignore", message=".*1024 bits.*")

REGISTRATION_TOKEN = "reg-token-3f9c2a"
DEPLOYMENT_ID = "deploy-1"
ROLE = "http://purl.imsglobal.org/vocab/lis/v2/membership#"
LINEITEMS_TYPE = "application/vnd.ims.lis.v2.lineitemcontainer+json"
SCORE_TYPE = "application/vnd.ims.lis.v1.score+json"
NRPS_SCOPE = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
SCORE_SCOPE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
LINEITEM_SCOPE = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


class Key:
    """An RSA key pair with its JWK (kid = RFC 7638 thumbprint, as jwcrypto makes it)."""

    def __init__(self, bits=2048, kid=None):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.private_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.public_pem = (
            self.key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        jwk = JWK.from_pem(self.public_pem.encode())
        self.kid = kid or jwk.thumbprint()
        self.jwk = json.loads(jwk.export_public())
        self.jwk.update({"kid": self.kid, "alg": "RS256", "use": "sig"})

    def sign(self, payload, headers=None):
        h = {"kid": self.kid}
        h.update(headers or {})
        return jwt.encode(payload, self.private_pem, algorithm="RS256", headers=h)


class State:
    def __init__(self, base):
        self.lock = threading.Lock()
        self.base = base
        self.issuer = base
        self.key = Key()
        self.old_keys = []
        self.weak_key = Key(bits=1024, kid="weak-1024")
        self.attacker = Key()
        self.client_id = None
        self.redirect_uris = []
        self.tool_login = None
        self.tool_launch = None
        self.tool_jwks = None
        self.launches = {}
        self.seen_jti = set()
        self.fail_scores = []
        self.ungradable = set()
        self.stall_seconds = 0.0
        self.stall_count = 0
        # Seconds the key set endpoint sleeps before answering (a slow platform).
        self.jwks_delay = 0.0
        self.line_items = {}
        self.next_line_item = 1
        self.log = {
            "registrations": [],
            "auth": [],
            "tokens": [],
            "token_rejections": [],
            "scores": [],
            "line_items": [],
            "deep_links": [],
            "nrps": [],
            "jwks_fetches": 0,
            "storage": [],
        }
        self.members = [
            {"user_id": "learner-1", "name": "Lea Learner", "roles": [ROLE + "Learner"], "status": "Active"},
            {"user_id": "learner-2", "name": "Lou Learner", "roles": [ROLE + "Learner"], "status": "Active"},
            {"user_id": "teacher-1", "name": "Tia Teacher", "roles": [ROLE + "Instructor"], "status": "Active"},
            {"user_id": "learner-3", "name": "Lin Learner", "roles": [ROLE + "Learner"], "status": "Active"},
            {"user_id": "learner-4", "name": "Lyn Learner", "roles": [ROLE + "Learner"], "status": "Active"},
        ]
        self.line_item("Line item given by the platform", 10, resource_link_id="rl-preset")

    def line_item(self, label, maximum, resource_link_id=None, tag=None, resource_id=None):
        n = self.next_line_item
        self.next_line_item += 1
        item = {
            "id": f"{self.base}/lineitems/{n}/lineitem?type_id=7",
            "label": label,
            "scoreMaximum": maximum,
        }
        if resource_link_id:
            item["resourceLinkId"] = resource_link_id
        if tag:
            item["tag"] = tag
        if resource_id:
            item["resourceId"] = resource_id
        self.line_items[n] = item
        return item

    def jwks(self):
        return {"keys": [k.jwk for k in [self.key] + self.old_keys + [self.weak_key]]}


STATE: State = None  # type: ignore


class PlatformConf(LTI1P3PlatformConfAbstract):
    def init_platform_config(self, **kwargs):
        s = STATE
        reg = (
            Registration()
            .set_iss(s.issuer)
            .set_client_id(s.client_id)
            .set_deployment_id(DEPLOYMENT_ID)
            .set_launch_url(s.tool_launch)
            .set_deeplink_launch_url(s.tool_launch)
            .set_oidc_login_url(s.tool_login)
            .set_tool_key_set_url(s.tool_jwks)
            .set_platform_public_key(s.key.public_pem)
            .set_platform_private_key(s.key.private_pem)
        )
        self._registration = reg

    def get_registration_by_params(self, **kwargs):
        return self._registration


class DictRequest(Request):
    def build_metadata(self, request):
        return request


class MessageLaunch(LTIAdvantageMessageLaunchAbstract):
    def render_launch_form(self, launch_data, **kwargs):
        return launch_data


def hs256(payload, header, secret: bytes) -> str:
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def craft(token: str, m: dict) -> str:
    """Re-signs a library-made id_token with the mutations `m` applied."""
    s = STATE
    payload = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    for k, v in m.get("set", {}).items():
        payload[k] = v
    for k, delta in m.get("set_rel", {}).items():
        payload[k] = now + delta
    for k in m.get("del", []):
        payload.pop(k, None)
    how = m.get("sign", "platform")
    if how == "none":
        return f"{b64json({'alg': 'none', 'kid': s.key.kid})}.{b64json(payload)}."
    if how == "hs256-public-key":
        return hs256(payload, {"alg": "HS256", "typ": "JWT", "kid": s.key.kid}, s.key.public_pem.encode())
    if how == "no-kid":
        return jwt.encode(payload, s.key.private_pem, algorithm="RS256")
    if how == "unknown-kid":
        return jwt.encode(payload, s.key.private_pem, algorithm="RS256", headers={"kid": "no-such-key"})
    if how == "rs512":
        return jwt.encode(payload, s.key.private_pem, algorithm="RS512", headers={"kid": s.key.kid})
    if how == "attacker-jku":
        return s.attacker.sign(payload, {"jku": f"{s.base}/attacker/jwks", "x5u": f"{s.base}/attacker/jwks"})
    if how == "attacker-embedded-jwk":
        return jwt.encode(
            payload,
            s.attacker.private_pem,
            algorithm="RS256",
            headers={"kid": s.key.kid, "jwk": s.attacker.jwk},
        )
    if how == "attacker-as-platform":
        return jwt.encode(payload, s.attacker.private_pem, algorithm="RS256", headers={"kid": s.key.kid})
    if how == "weak":
        return s.weak_key.sign(payload)
    if how == "tampered":
        good = s.key.sign(payload)
        h, _, sig = good.split(".")
        payload["sub"] = "someone-else"
        return f"{h}.{b64json(payload)}.{sig}"
    return s.key.sign(payload)


def auto_post(action: str, fields: dict, title="Launching") -> str:
    inputs = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(str(v))}">'
        for k, v in fields.items()
        if v is not None
    )
    return (
        f"<!doctype html><html><head><title>{title}</title></head><body>"
        f'<form id="f" method="post" action="{html.escape(action)}">{inputs}</form>'
        '<script>document.getElementById("f").submit();</script></body></html>'
    )


COURSE_PAGE = """<!doctype html><html><head><title>Course</title></head><body>
<h1>Biology 101</h1>
<iframe id="tool" name="tool" src="%(start)s" style="width:100%%;height:600px"
  allow="microphone; camera"></iframe>
<script>
(function(){
  var toolOrigin = %(tool_origin)s;
  var store = {};
  window.storageLog = [];
  window.addEventListener('message', function(ev){
    var d = ev.data || {};
    if (d.subject !== 'lti.put_data' && d.subject !== 'lti.get_data') return;
    window.storageLog.push({subject: d.subject, origin: ev.origin, key: d.key, had: !!store[ev.origin + '|' + d.key]});
    if (ev.origin !== toolOrigin) return;
    var k = ev.origin + '|' + d.key;
    if (d.subject === 'lti.put_data') {
      store[k] = d.value;
      ev.source.postMessage({subject: 'lti.put_data.response', message_id: d.message_id, key: d.key, value: d.value}, ev.origin);
    } else {
      ev.source.postMessage({subject: 'lti.get_data.response', message_id: d.message_id, key: d.key, value: store[k]}, ev.origin);
    }
  });
})();
</script></body></html>"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    # ---- plumbing ----
    def send(self, status, body, content_type="application/json", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first (a stalled request outlived its timeout).
            sys.stderr.write(f"platform: client gone before the {status} answer to {self.path}\n")

    def html(self, status, body):
        self.send(status, body, "text/html; charset=utf-8")

    def body(self) -> bytes:
        # Read once, always: an unread body would corrupt the next request on
        # a kept-alive connection.
        if getattr(self, "_body", None) is None:
            n = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(n) if n else b""
        return self._body

    def form(self) -> dict:
        return dict(urllib.parse.parse_qsl(self.body().decode(), keep_blank_values=True))

    def query(self) -> dict:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query, keep_blank_values=True))

    def route(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def bearer(self, scopes) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self.send(401, {"error": "no bearer token"})
            return False
        try:
            ok = PlatformConf().validate_token(auth[7:], allowed_scopes=scopes)
        except Exception as e:  # expired, wrong key (after a rotation), malformed
            self.send(401, {"error": f"invalid token: {e}"})
            return False
        if not ok:
            self.send(403, {"error": "scope not granted"})
            return False
        return True

    # ---- dispatch ----
    def do_GET(self):
        r = self.route()
        self._body = None
        self.body()
        s = STATE
        try:
            if r == "/.well-known/openid-configuration":
                return self.send(200, openid_configuration(s.issuer))
            if r == "/mismatch/openid-configuration":
                return self.send(200, openid_configuration("http://platform.example.com"))
            if r == "/jwks":
                with s.lock:
                    s.log["jwks_fetches"] += 1
                    delay = s.jwks_delay
                if delay:
                    time.sleep(delay)
                return self.send(200, s.jwks())
            if r == "/attacker/jwks":
                return self.send(200, {"keys": [s.attacker.jwk]})
            if r == "/auth":
                return self.auth(self.query())
            if r == "/lineitems":
                return self.list_line_items()
            if r == "/memberships":
                return self.memberships()
            if r == "/course":
                return self.course()
            if r == "/start":
                return self.start()
            if r == "/control/log":
                with s.lock:
                    return self.send(200, s.log)
            return self.send(404, {"error": "not found"})
        except Exception as e:  # the test sees the failure instead of a hang
            return self.send(500, {"error": repr(e)})

    def do_POST(self):
        r = self.route()
        self._body = None
        self.body()
        try:
            if r == "/register":
                return self.register()
            if r == "/token":
                return self.token()
            if r == "/lineitems":
                return self.create_line_item()
            if r.startswith("/lineitems/") and r.endswith("/lineitem/scores"):
                return self.score(r)
            if r == "/dl/return":
                return self.deep_link_return()
            if r == "/control/launch":
                return self.control_launch()
            if r == "/control/setup":
                return self.control_setup()
            if r == "/control/fail-scores":
                spec = json.loads(self.body() or b"{}")
                with STATE.lock:
                    STATE.fail_scores = list(spec.get("statuses", []))
                    STATE.ungradable = set(spec.get("ungradable", []))
                    # Chaos: the next `stall_count` score posts hang this long first.
                    STATE.stall_seconds = float(spec.get("stall_seconds", 0))
                    STATE.stall_count = int(spec.get("stall_count", 0))
                return self.send(200, {"ok": True})
            if r == "/control/jwks-delay":
                with STATE.lock:
                    STATE.jwks_delay = float(json.loads(self.body() or b"{}").get("seconds", 0))
                return self.send(200, {"ok": True})
            if r == "/control/issuer":
                # Hosted Canvas: one issuer (https://canvas.instructure.com) for
                # every school, the configuration served from the school's host.
                with STATE.lock:
                    STATE.issuer = json.loads(self.body())["issuer"]
                return self.send(200, {"ok": True})
            if r == "/control/rotate-key":
                with STATE.lock:
                    STATE.old_keys = [STATE.key]
                    STATE.key = Key()
                return self.send(200, {"kid": STATE.key.kid})
            return self.send(404, {"error": "not found"})
        except Exception as e:
            return self.send(500, {"error": repr(e)})

    # ---- dynamic registration ----
    def register(self):
        s = STATE
        if self.headers.get("Authorization") != f"Bearer {REGISTRATION_TOKEN}":
            return self.send(401, {"error": "registration token required"})
        cfg = json.loads(self.body())
        tool = cfg.get("https://purl.imsglobal.org/spec/lti-tool-configuration", {})
        problems = [k for k in ["initiate_login_uri", "redirect_uris", "jwks_uri", "scope"] if not cfg.get(k)]
        if not any(m.get("type") == "LtiDeepLinkingRequest" for m in tool.get("messages", [])):
            problems.append("no deep linking message")
        if problems:
            return self.send(400, {"error": "invalid tool configuration", "missing": problems})
        with s.lock:
            s.client_id = "viva-" + secrets.token_hex(6)
            s.redirect_uris = list(cfg["redirect_uris"])
            s.tool_login = cfg["initiate_login_uri"]
            s.tool_jwks = cfg["jwks_uri"]
            s.tool_launch = tool.get("target_link_uri") or s.redirect_uris[0]
            s.log["registrations"].append({"config": cfg, "client_id": s.client_id})
        answer = dict(cfg)
        answer["client_id"] = s.client_id
        answer["https://purl.imsglobal.org/spec/lti-tool-configuration"] = dict(tool, deployment_id=DEPLOYMENT_ID)
        return self.send(200, answer)

    def control_setup(self):
        """Manual registration of the tool (no dynamic registration)."""
        spec = json.loads(self.body())
        s = STATE
        with s.lock:
            s.client_id = spec["client_id"]
            s.redirect_uris = [spec["launch"]]
            s.tool_login = spec["login"]
            s.tool_launch = spec["launch"]
            s.tool_jwks = spec["jwks"]
        return self.send(200, {"ok": True})

    # ---- launches ----
    def control_launch(self):
        """Prepares a launch; answers with the login initiation parameters."""
        spec = json.loads(self.body())
        s = STATE
        hint = secrets.token_hex(8)
        with s.lock:
            s.launches[hint] = spec
        params = {
            "iss": s.issuer,
            "login_hint": spec["user"],
            "target_link_uri": spec.get("target_link_uri", s.tool_launch),
            "lti_message_hint": hint,
            "client_id": s.client_id,
            "lti_deployment_id": DEPLOYMENT_ID,
        }
        if spec.get("storage"):
            params["lti_storage_target"] = "_parent"
        return self.send(200, {"login_url": s.tool_login, "params": params, "hint": hint})

    def start(self):
        """Inside the course page's iframe: posts the login initiation to the tool."""
        hint = self.query().get("hint", "")
        s = STATE
        spec = s.launches.get(hint, {})
        fields = {
            "iss": s.issuer,
            "login_hint": spec.get("user"),
            "target_link_uri": s.tool_launch,
            "lti_message_hint": hint,
            "client_id": s.client_id,
            "lti_deployment_id": DEPLOYMENT_ID,
            "lti_storage_target": "_parent",
        }
        return self.html(200, auto_post(s.tool_login, fields))

    def course(self):
        hint = self.query().get("hint", "")
        s = STATE
        origin = urllib.parse.urlsplit(s.tool_launch)
        page = COURSE_PAGE % {
            "start": html.escape(f"/start?hint={hint}"),
            "tool_origin": json.dumps(f"{origin.scheme}://{origin.netloc}"),
        }
        return self.html(200, page)

    def auth(self, q):
        """The OIDC authorization endpoint: checks the auth request, signs the launch."""
        s = STATE
        with s.lock:
            s.log["auth"].append(q)
        problems = []
        if q.get("redirect_uri") not in s.redirect_uris:
            problems.append("redirect_uri not registered")
        for k, want in [("scope", "openid"), ("response_type", "id_token"), ("response_mode", "form_post"),
                        ("prompt", "none"), ("client_id", s.client_id)]:
            if q.get(k) != want:
                problems.append(f"{k} must be {want}")
        for k in ["state", "nonce", "login_hint", "lti_message_hint"]:
            if not q.get(k):
                problems.append(f"{k} missing")
        spec = s.launches.get(q.get("lti_message_hint", ""))
        if spec is None:
            problems.append("unknown lti_message_hint")
        elif q.get("login_hint") != spec["user"]:
            problems.append("login_hint does not match")
        if problems:
            return self.send(400, {"error": "invalid_request", "problems": problems})
        launch = MessageLaunch(
            DictRequest({"method": "GET", "get_data": q, "form_data": {}, "headers": {}, "content_type": None,
                         "path": "/auth", "json": None}),
            PlatformConf(),
        )
        launch.set_user_data(spec["user"], spec.get("roles", []), full_name=spec.get("name"),
                             email_address=spec.get("email"))
        launch.set_launch_context_claim(spec.get("context", "course-1"), context_title=spec.get("context_title", "Biology 101"))
        launch.set_launch_presentation_claim(document_target="iframe", return_url=f"{s.base}/course/return")
        if spec.get("locale"):
            # The user's language (LTI 1.3 launch_presentation.locale).
            launch.lti_claim_launch_presentation[
                "https://purl.imsglobal.org/spec/lti/claim/launch_presentation"]["locale"] = spec["locale"]
        if spec.get("custom"):
            launch.set_custom_parameters_claim(spec["custom"])
        if spec.get("kind", "resource") == "deeplink":
            launch.set_dl(f"{s.base}/dl/return", title="Add content", accept_types={"ltiResourceLink"},
                          extra_data={"course": spec.get("context", "course-1"), "nonce": "dl-data-7"})
        else:
            launch.set_resource_link_claim(spec.get("resource_link", "rl-1"), title=spec.get("title", "Oral exam"))
        ags = spec.get("ags")
        if ags:
            lineitem = None
            if ags.get("lineitem"):
                lineitem = s.line_items[ags["lineitem"]]["id"]
            launch.set_ags(lineitems_url=f"{s.base}/lineitems" if ags.get("lineitems", True) else None,
                           lineitem_url=lineitem, allow_creating_lineitems=True)
        if spec.get("nrps"):
            launch.set_nrps(f"{s.base}/memberships")
        data = launch.lti_launch()
        token = data["id_token"]
        if spec.get("mutate"):
            token = craft(token, spec["mutate"])
        fields = {"id_token": token, "state": data["state"]}
        if spec.get("storage"):
            fields["lti_storage_target"] = "_parent"
        return self.html(200, auto_post(data["launch_url"], fields))

    # ---- services ----
    def token(self):
        s = STATE
        form = self.form()
        assertion = form.get("client_assertion", "")
        ua = self.headers.get("User-Agent", "")
        problems = []
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except Exception as e:
            return self.send(400, {"error": "invalid_client", "error_description": f"bad assertion: {e}"})
        now = int(time.time())
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if f"{s.base}/token" not in auds:
            problems.append("aud is not the token endpoint")
        if claims.get("iss") != s.client_id or claims.get("sub") != s.client_id:
            problems.append("iss and sub must be the client id")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int) or exp <= now or exp > now + 305:
            problems.append("exp must be within 5 minutes")
        if isinstance(exp, int) and isinstance(iat, int) and exp - iat > 300:
            problems.append("assertion lives longer than 5 minutes")
        jti = claims.get("jti")
        with s.lock:
            if not jti:
                problems.append("jti missing")
            elif jti in s.seen_jti:
                problems.append("jti replayed")
            else:
                s.seen_jti.add(jti)
        if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            problems.append("client_assertion_type")
        if problems:
            with s.lock:
                s.log["token_rejections"].append({"problems": problems, "claims": claims})
            return self.send(400, {"error": "invalid_client", "error_description": "; ".join(problems)})
        try:
            answer = PlatformConf().get_access_token(form)  # verifies the signature with the tool's JWKS
        except Exception as e:
            with s.lock:
                s.log["token_rejections"].append({"problems": [repr(e)], "claims": claims})
            return self.send(400, {"error": "invalid_client", "error_description": repr(e)})
        with s.lock:
            s.log["tokens"].append({"header": header, "claims": claims, "scope": form.get("scope"), "user_agent": ua})
        return self.send(200, answer)

    def list_line_items(self):
        if not self.bearer([LINEITEM_SCOPE, "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem.readonly"]):
            return
        q = self.query()
        items = [
            i for i in STATE.line_items.values()
            if (not q.get("resource_link_id") or i.get("resourceLinkId") == q["resource_link_id"])
            and (not q.get("tag") or i.get("tag") == q["tag"])
        ]
        return self.send(200, items, LINEITEMS_TYPE)

    def create_line_item(self):
        if not self.bearer([LINEITEM_SCOPE]):
            return
        if not (self.headers.get("Content-Type") or "").startswith("application/vnd.ims.lis.v2.lineitem+json"):
            return self.send(415, {"error": "line item content type"})
        spec = json.loads(self.body())
        s = STATE
        with s.lock:
            item = s.line_item(spec["label"], spec["scoreMaximum"], spec.get("resourceLinkId"), spec.get("tag"),
                               spec.get("resourceId"))
            s.log["line_items"].append(item)
        return self.send(201, item, "application/vnd.ims.lis.v2.lineitem+json")

    def score(self, route):
        s = STATE
        q = self.query()
        n = int(route.split("/")[2])
        if n not in s.line_items or q.get("type_id") != "7":
            # The line item URL's query string must survive the /scores join.
            return self.send(404, {"error": "no such line item (query string lost?)"})
        if not self.bearer([SCORE_SCOPE]):
            return
        if self.headers.get("Content-Type") != SCORE_TYPE:
            return self.send(415, {"error": "score content type"})
        body = json.loads(self.body())
        stall = 0.0
        with s.lock:
            if s.stall_count > 0:
                s.stall_count -= 1
                stall = s.stall_seconds
        if stall:
            time.sleep(stall)
        with s.lock:
            if s.fail_scores:
                status = s.fail_scores.pop(0)
                s.log["scores"].append({"lineitem": n, "body": body, "refused": status})
                return self.send(status, {"error": "injected failure"})
            if body.get("userId") in s.ungradable:
                s.log["scores"].append({"lineitem": n, "body": body, "refused": 400})
                return self.send(400, {"error": "User is not gradable in this course"})
            s.log["scores"].append({"lineitem": n, "body": body, "query": q,
                                    "user_agent": self.headers.get("User-Agent", "")})
        return self.send(200, {})

    def memberships(self):
        if not self.bearer([NRPS_SCOPE]):
            return
        s = STATE
        page = int(self.query().get("p", "1"))
        size = 2
        members = s.members[(page - 1) * size: page * size]
        headers = {}
        if page * size < len(s.members):
            headers["Link"] = f'<{s.base}/memberships?p={page + 1}>; rel="next"'
        with s.lock:
            s.log["nrps"].append({"page": page, "accept": self.headers.get("Accept")})
        return self.send(200, {"id": f"{s.base}/memberships", "context": {"id": "course-1"}, "members": members},
                         "application/vnd.ims.lti-nrps.v2.membershipcontainer+json", headers)

    def deep_link_return(self):
        s = STATE
        token = self.form().get("JWT", "")
        problems = []
        try:
            items = PlatformConf().validate_deeplinking_resp({"JWT": token})  # signature with the tool's JWKS
            claims = jwt.decode(token, options={"verify_signature": False})
        except Exception as e:
            return self.send(400, {"error": repr(e)})
        aud = claims.get("aud")
        if s.issuer not in (aud if isinstance(aud, list) else [aud]):
            problems.append("aud must be the platform issuer")
        if claims.get("iss") != s.client_id:
            problems.append("iss must be the client id")
        if claims.get("https://purl.imsglobal.org/spec/lti/claim/deployment_id") != DEPLOYMENT_ID:
            problems.append("deployment_id")
        data = claims.get("https://purl.imsglobal.org/spec/lti-dl/claim/data")
        if data != {"course": "course-1", "nonce": "dl-data-7"}:
            problems.append(f"data not echoed: {data!r}")
        with s.lock:
            s.log["deep_links"].append({"items": items, "claims": claims, "problems": problems})
        if problems:
            return self.send(400, {"error": "; ".join(problems)})
        return self.send(200, {"ok": True, "items": items})


def openid_configuration(issuer):
    b = STATE.base
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{b}/auth",
        "token_endpoint": f"{b}/token",
        "jwks_uri": f"{b}/jwks",
        "registration_endpoint": f"{b}/register",
        "scopes_supported": ["openid"],
        "response_types_supported": ["id_token"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "claims_supported": ["sub", "iss", "name", "email"],
        "https://purl.imsglobal.org/spec/lti-platform-configuration": {
            "product_family_code": "lti1p3platform-harness",
            "version": "0.1.8",
            "messages_supported": [{"type": "LtiResourceLinkRequest"}, {"type": "LtiDeepLinkingRequest"}],
        },
    }


def main():
    global STATE
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]
    # The platform is "localhost", the tool "127.0.0.1": two sites for the browser.
    STATE = State(f"http://localhost:{port}")
    print(json.dumps({"port": port, "base": STATE.base, "registration_token": REGISTRATION_TOKEN}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
