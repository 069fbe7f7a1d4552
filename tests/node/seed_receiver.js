// webhookd test harness: a webhook receiver built from the BookingScheduler webhook
// documentation (shared/seed/webhooks-doc.txt). Its "Express.js example" and
// "verifySignature" code are copied verbatim, because receivers copy them verbatim;
// every deviation is marked with a "// webhookd test harness:" comment.
// Environment: WEBHOOK_SIGNING_SECRET (as in the seed), PORT (0 picks a free port),
// RECORD_FILE (one JSON line per response), RESPONSE_PLAN (optional JSON, see below).
const fs = require('fs'); // webhookd test harness: to append to RECORD_FILE

// Express.js example
const express = require('express');
const app = express();

// webhookd test harness: record every response as one JSON line in RECORD_FILE.
app.use((req, res, next) => {
  const receivedAt = Date.now() / 1000;
  res.on('finish', () => {
    const record = {
      status: res.statusCode,
      path: req.path,
      headers: req.headers,
      body: req.body === undefined ? null : req.body,
      received_at: receivedAt,
      verified: res.statusCode === 200,
    };
    fs.appendFileSync(process.env.RECORD_FILE, JSON.stringify(record) + '\n');
  });
  next();
});

// webhookd test harness: RESPONSE_PLAN, e.g. {"fail_first": 2, "status": 500}, answers the
// first fail_first requests of each delivery id (x-bookingscheduler-delivery header; requests
// without it share one count) with that status before the seed's handler runs.
const plan = JSON.parse(process.env.RESPONSE_PLAN || '{}');
const seen = new Map();
app.use((req, res, next) => {
  const id = req.headers['x-bookingscheduler-delivery'] || '';
  seen.set(id, (seen.get(id) || 0) + 1);
  if (seen.get(id) <= (plan.fail_first || 0)) {
    return res.status(plan.status || 500).send('Planned failure (RESPONSE_PLAN)');
  }
  next();
});

app.post('/webhooks/bookingscheduler', express.json(), (req, res) => {
  const event = req.body;

  // Verify webhook signature (see Signature Verification section)
  const signature = req.headers['x-bookingscheduler-signature'];
  if (!verifySignature(signature, req.body)) {
    return res.status(401).send('Invalid signature');
  }

  // Handle different event types
  switch (event.event) {
    case 'booking.created':
      console.log('New booking:', event.data.id);
      // Your custom logic here
      break;

    case 'booking.cancelled':
      console.log('Booking cancelled:', event.data.id);
      // Your custom logic here
      break;

    case 'payment.succeeded':
      console.log('Payment succeeded:', event.data.id);
      // Your custom logic here
      break;

    default:
      console.log('Unhandled event:', event.event);
  }

  // Acknowledge receipt
  res.status(200).send('OK');
});

// webhookd test harness: listen on PORT at 127.0.0.1 instead of app.listen(3000), and
// announce the real port (PORT=0 picks a free one) as "LISTENING <port>" on stdout.
const server = app.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  console.log(`LISTENING ${server.address().port}`);
});

const crypto = require('crypto');

function verifySignature(signature, payload) {
  const secret = process.env.WEBHOOK_SIGNING_SECRET;
  const hmac = crypto.createHmac('sha256', secret);
  const digest = hmac.update(JSON.stringify(payload)).digest('hex');

  return crypto.timingSafeEqual(
    Buffer.from(signature),
    Buffer.from(digest)
  );
}
