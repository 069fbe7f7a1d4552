// webhookd test oracle: what JavaScript makes of JSON texts, for tests/integration's
// canonical JSON property tests. No npm packages needed.
//
// Reads one request per line on stdin, answers one line on stdout, in order:
//   {"text": "..."}    a JSON text (the request line itself is ASCII JSON, so lone
//                      surrogates and U+2028 survive the trip exactly)
//   {"base64": "..."}  body bytes, decoded as UTF-8 the way Node decodes a request body
// Answer: {"ok": true, "out": JSON.stringify(JSON.parse(text)), "unsafe": bool,
//          "decode_altered": bool} or {"ok": false, "error": "...", "decode_altered": bool}.
// "unsafe" is true when the parsed value holds an integer beyond Number.isSafeInteger;
// "decode_altered" is true when decoding the bytes as UTF-8 did not preserve them.
'use strict';
const readline = require('readline');

function hasUnsafeInteger(value) {
  if (typeof value === 'number') return Number.isInteger(value) && !Number.isSafeInteger(value);
  if (value === null || typeof value !== 'object') return false;
  return Object.values(value).some(hasUnsafeInteger);
}

function answer(request) {
  let text = request.text;
  let decodeAltered = false;
  if (request.base64 !== undefined) {
    const bytes = Buffer.from(request.base64, 'base64');
    text = bytes.toString('utf8');
    decodeAltered = !Buffer.from(text, 'utf8').equals(bytes);
  }
  try {
    const value = JSON.parse(text);
    return {
      ok: true,
      out: JSON.stringify(value),
      unsafe: hasUnsafeInteger(value),
      decode_altered: decodeAltered,
    };
  } catch (error) {
    return { ok: false, error: String(error.message), decode_altered: decodeAltered };
  }
}

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
  process.stdout.write(JSON.stringify(answer(JSON.parse(line))) + '\n');
});
