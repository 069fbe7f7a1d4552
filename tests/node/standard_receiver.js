// webhookd test harness: a Standard Webhooks receiver that verifies with the official
// `standardwebhooks` npm package, as its README shows: `new Webhook(secret).verify(payload,
// headers)` on the RAW request body (express.raw keeps the bytes as a Buffer).
// Environment:
//   WEBHOOK_SECRETS  comma-separated whsec_ secrets the receiver knows (only the new one, only
//                    the old one, or both during a rotation); a request passes if any verifies.
//   PORT             0 picks a free port; "LISTENING <port>" is printed once listening.
//   RECORD_FILE      one JSON line per response: status, path, headers, body (the raw text),
//                    received_at, verified, error (the library's message), secret_index.
// Every path is accepted, so the seed receiver's URL layout works here too.
const fs = require('fs');
const express = require('express');
const { Webhook } = require('standardwebhooks');

const secrets = (process.env.WEBHOOK_SECRETS || '')
  .split(',')
  .map((s) => s.trim())
  .filter((s) => s.length > 0);
if (secrets.length === 0) {
  console.error('WEBHOOK_SECRETS is empty: give the receiver at least one whsec_ secret');
  process.exit(2);
}
const webhooks = secrets.map((secret) => new Webhook(secret));

const app = express();

app.post('*', express.raw({ type: () => true, limit: '2mb' }), (req, res) => {
  const receivedAt = Date.now() / 1000;
  // express.raw leaves req.body as {} when there was no body to read.
  const raw = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
  let verified = false;
  let secretIndex = null;
  const errors = [];
  for (let i = 0; i < webhooks.length && !verified; i++) {
    try {
      webhooks[i].verify(raw, req.headers);
      verified = true;
      secretIndex = i;
    } catch (err) {
      errors.push(`secret #${i + 1}: ${err.message}`);
    }
  }
  const status = verified ? 200 : 401;
  const record = {
    status,
    path: req.path,
    headers: req.headers,
    body: raw.toString('utf8'),
    received_at: receivedAt,
    verified,
    error: verified ? null : errors.join('; '),
    secret_index: secretIndex,
  };
  res.on('finish', () => {
    fs.appendFileSync(process.env.RECORD_FILE, JSON.stringify(record) + '\n');
  });
  res.status(status).send(verified ? 'OK' : 'Invalid signature');
});

const server = app.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  console.log(`LISTENING ${server.address().port}`);
});
