// Loopback OpenID Connect provider for dermgate's console sign-in tests.
//
// oidc-provider (a certified OpenID Provider implementation) with:
//   - dynamic client registration at /reg (each test registers its own client and redirect URI);
//   - PKCE required; ID tokens carry the profile claims (roles, fhir_practitioner) themselves;
//   - a minimal sign-in page at /interaction/:uid (inputs "login" and "password") that grants the
//     requested scopes at once (no consent page);
//   - fixed test accounts (below) with role claims a hospital's groups would give.
// Prints one JSON line {"port": N, "issuer": "..."} on stdout once listening (PORT=0 picks a free port).
// Test infrastructure only: never expose it beyond loopback.

import http from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import Provider from 'oidc-provider';

export const PASSWORD = 'oidc-test-password';
const ACCOUNTS = {
  'dr.oidc': { name: 'Dr. Olivia Idp', email: 'dr.oidc@hospital.test', roles: ['derm-clinicians', 'staff'],
               fhir_practitioner: 'Practitioner/prac-oidc-1' },
  'privacy.oidc': { name: 'Pat Privacy', email: 'privacy@hospital.test', roles: ['privacy-office', 'staff'] },
  'it.oidc': { name: 'Ivan Tech', email: 'it@hospital.test', roles: ['it-ops'] },
  'visitor.oidc': { name: 'Vic Visitor', email: 'visitor@hospital.test', roles: ['visitors'] },
};

const server = http.createServer();
await new Promise((resolve) => server.listen(Number(process.env.PORT || 0), '127.0.0.1', resolve));
const port = server.address().port;
const issuer = `http://127.0.0.1:${port}`;

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients: [],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  async findAccount(ctx, id) {
    const account = ACCOUNTS[id];
    if (!account) return undefined;
    return { accountId: id, async claims() { return { sub: id, preferred_username: id, ...account }; } };
  },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username', 'roles', 'fhir_practitioner'],
    email: ['email'],
  },
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    registration: { enabled: true },
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => true },
  ttl: { IdToken: Number(process.env.ID_TOKEN_TTL_S || 3600), AccessToken: 3600, AuthorizationCode: 60,
         Interaction: 3600, Session: 3600, Grant: 3600 },
});
provider.proxy = false;

const page = (uid, error) => `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Hospital sign-in</title></head>
<body><main><h1>Hospital sign-in (test provider)</h1>${error ? `<p role="alert">${error}</p>` : ''}
<form method="post" action="/interaction/${uid}/login">
<label for="login">User</label> <input id="login" name="login" autocomplete="username" autofocus>
<label for="password">Password</label> <input id="password" name="password" type="password">
<button type="submit" id="idp-submit">Sign in</button></form></main></body></html>`;

function readBody(req) {
  return new Promise((resolve, reject) => {
    let data = '';
    req.on('data', (chunk) => { data += chunk; if (data.length > 1e5) reject(new Error('body too large')); });
    req.on('end', () => resolve(new URLSearchParams(data)));
    req.on('error', reject);
  });
}

const callback = provider.callback();
server.on('request', async (req, res) => {
  const match = /^\/interaction\/([^/?]+)(\/login)?/.exec(req.url);
  if (!match) return callback(req, res);
  try {
    const details = await provider.interactionDetails(req, res);
    if (req.method === 'GET') {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
      return res.end(page(details.uid));
    }
    const form = await readBody(req);
    const accountId = form.get('login');
    if (!ACCOUNTS[accountId] || form.get('password') !== PASSWORD) {
      res.writeHead(401, { 'Content-Type': 'text/html; charset=utf-8' });
      return res.end(page(details.uid, 'Wrong user or password.'));
    }
    const grant = new provider.Grant({ accountId, clientId: details.params.client_id });
    grant.addOIDCScope(String(details.params.scope));
    const grantId = await grant.save();
    return await provider.interactionFinished(req, res, { login: { accountId }, consent: { grantId } },
                                              { mergeWithLastSubmission: false });
  } catch (err) {
    res.writeHead(400, { 'Content-Type': 'text/plain' });
    return res.end(`interaction failed: ${err.message}`);
  }
});

process.stdout.write(`${JSON.stringify({ port, issuer })}\n`);
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
