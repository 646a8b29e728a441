// Test-only: a real OpenID Connect provider (panva's certified `oidc-provider`) for the tests.
//
//   IDP_PORT=4000 IDP_CLIENTS='[...]' IDP_ACCOUNTS=/tmp/accounts.json node server.mjs
//
// - IDP_CLIENTS: JSON list of {client_id, client_secret, redirect_uris, post_logout_redirect_uris}.
// - IDP_ACCOUNTS: a JSON file {"<login>": {"email": ..., "email_verified": true, "groups": [...]}},
//   read again on every sign-in, so a test changes someone's groups by rewriting it.
// - The sign-in page is the package's development interaction (any password; the login must be
//   in IDP_ACCOUNTS); consent is granted automatically (first-party clients).
// - PKCE is required for every client, so the relying party must send it.
// - Misbehaving token endpoint, per client id, for the refusal tests: the ID token of
//   `*-wrong-aud` is re-signed (with the provider's real key) for another audience, that of
//   `*-expired` with an `exp` ten minutes ago, `*-bad-nonce` with another nonce, `*-wrong-iss`
//   with another issuer, and that of `*-bad-sig` with another key under the same key id.
//   Everything else is the package's own behaviour.
// Prints "listening <issuer>" once it serves.

import { readFileSync } from 'node:fs';

import * as jose from 'jose';
import Provider from 'oidc-provider';

const port = Number(process.env.IDP_PORT);
const issuer = `http://127.0.0.1:${port}`;
const clients = JSON.parse(process.env.IDP_CLIENTS || '[]');
const accountsFile = process.env.IDP_ACCOUNTS;

function accounts() {
  return JSON.parse(readFileSync(accountsFile, 'utf8'));
}

const KID = 'test-signing-key';
const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await jose.exportJWK(privateKey)), kid: KID, alg: 'RS256', use: 'sig' };
const { privateKey: strangerKey } = await jose.generateKeyPair('RS256', { extractable: true });

const provider = new Provider(issuer, {
  clients: clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    redirect_uris: c.redirect_uris,
    post_logout_redirect_uris: c.post_logout_redirect_uris || [],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  })),
  jwks: { keys: [signingJwk] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  cookies: { keys: ['test-only-cookie-key'] },
  async findAccount(ctx, id) {
    const account = accounts()[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        const now = accounts()[id] || account;
        return { sub: id, preferred_username: id, name: now.name || id, ...now };
      },
    };
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid email profile groups');
    await grant.save();
    return grant;
  },
});

async function tamper(idToken, clientId) {
  const claims = jose.decodeJwt(idToken);
  let key = privateKey;
  if (clientId.endsWith('-wrong-aud')) {
    claims.aud = 'some-other-application';
  } else if (clientId.endsWith('-expired')) {
    claims.iat -= 3600;
    claims.exp = Math.floor(Date.now() / 1000) - 600;
  } else if (clientId.endsWith('-bad-sig')) {
    key = strangerKey;
  } else if (clientId.endsWith('-bad-nonce')) {
    claims.nonce = 'a-nonce-from-another-sign-in';
  } else if (clientId.endsWith('-wrong-iss')) {
    claims.iss = 'https://impostor.example';
  } else {
    return idToken;
  }
  return new jose.SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: KID, typ: 'JWT' }).sign(key);
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/token' && ctx.body && ctx.body.id_token && ctx.oidc?.client) {
    ctx.body = { ...ctx.body, id_token: await tamper(ctx.body.id_token, ctx.oidc.client.clientId) };
  }
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});
