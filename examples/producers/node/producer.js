// A booking system's side of instant-key-worker, complete: grant a guest access as the contract
// asks, hear the outcome, revoke the access, hear that outcome. Needs amqplib alone.
//
//   npm ci
//   AMQP_URL=amqp://booking:secret@127.0.0.1:5672/ GUEST_PHONE=+14155550100 node producer.js
//
// The broker user of AMQP_URL is the producer: the worker must trust it (IKW_TRUSTED_PUBLISHERS)
// and its outcome queue must exist (`ikw topology --producer booking`). Exits 0 when the key was
// delivered and revoked, 1 otherwise.
'use strict';

const crypto = require('node:crypto');
const amqp = require('amqplib');

const AMQP_URL = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const NAMESPACE = process.env.IKW_NAMESPACE || 'instant_keys';
const PHONE = process.env.GUEST_PHONE || '+14155550100';
const TIMEOUT = Number(process.env.OUTCOME_TIMEOUT || '30'); // seconds to wait for each outcome
// The broker checks userId against the connection's user: that is how the worker knows us.
const PRODUCER = decodeURIComponent(new URL(AMQP_URL).username) || 'guest';

// The outcomes that settle each event; any other (instant_key.deleted) is only printed.
const FINAL = {
  'access.granted': ['access.delivered', 'access.delivery_failed', 'access.rejected'],
  'access.revoked': ['access.revoke_completed', 'access.rejected'],
};

const grant = (guest, grantId) => ({
  type: 'access.granted',
  version: 1,
  event_id: crypto.randomUUID(),
  occurred_at: new Date().toISOString(),
  grant_id: grantId,
  user_identity: { user_identity_key: guest, full_name: 'Ada Lovelace', phone_number: PHONE },
  delivery: { channels: ['sms'], locale: 'en', time_zone: 'Europe/Paris' },
});

const revoke = (guest, grantId) => ({
  type: 'access.revoked',
  version: 1,
  event_id: crypto.randomUUID(),
  occurred_at: new Date().toISOString(),
  grant_id: grantId,
  user_identity: { user_identity_key: guest },
});

class Outcomes {
  // Our outcome queue, consumed: each outcome printed, then handed to whoever waits for it.
  constructor(channel) {
    this.channel = channel;
    this.waiting = new Map(); // event_id -> { type, settle }
    this.returned = new Set(); // message ids the broker returned: no queue took them
    channel.on('return', (message) => this.returned.add(message.properties.messageId));
  }

  onMessage(message) {
    const outcome = JSON.parse(message.content.toString());
    console.log(`heard ${message.fields.routingKey}: ${JSON.stringify(outcome)}`);
    const waiter = this.waiting.get(outcome.event_id);
    if (waiter && FINAL[waiter.type].includes(outcome.type)) waiter.settle(outcome);
    // Outcomes come at least once: a real consumer records them by event_id, then acks.
    this.channel.ack(message);
  }

  publish(event) {
    // persistent, mandatory, confirmed: the callback runs when the broker confirmed (or nacked).
    const options = {
      persistent: true,
      mandatory: true,
      contentType: 'application/json',
      userId: PRODUCER,
      messageId: event.event_id,
    };
    const body = Buffer.from(JSON.stringify(event));
    return new Promise((resolve, reject) => {
      this.channel.publish(NAMESPACE, event.type, body, options, (err) => {
        if (err) reject(new Error(`the broker did not take ${event.type}: ${err}`));
        else if (this.returned.has(event.event_id)) {
          reject(new Error(`no queue takes ${event.type}: is namespace ${NAMESPACE} declared?`));
        } else resolve();
      });
    });
  }

  // Publish the event and wait for the outcome that settles it.
  async send(event) {
    let timer;
    const heard = new Promise((resolve, reject) => {
      this.waiting.set(event.event_id, { type: event.type, settle: resolve });
      timer = setTimeout(
        () => reject(new Error(`no outcome within ${TIMEOUT} s: is a worker running?`)),
        TIMEOUT * 1000,
      );
    });
    try {
      await this.publish(event);
      console.log(`published ${event.type} ${event.event_id} (grant ${event.grant_id})`);
      return await heard;
    } finally {
      clearTimeout(timer);
    }
  }
}

async function run(connection) {
  const channel = await connection.createConfirmChannel();
  channel.on('error', () => {}); // the promise of the failing call says why
  const outcomes = new Outcomes(channel);
  const queue = `${NAMESPACE}.outcomes.${PRODUCER}`;
  try {
    await channel.consume(queue, (message) => message && outcomes.onMessage(message));
  } catch (err) {
    throw new Error(`${err.message}: have the operator run \`ikw topology --producer ${PRODUCER}\``);
  }
  const guest = `guest-${crypto.randomBytes(4).toString('hex')}`;
  const grantId = `booking-${crypto.randomBytes(3).toString('hex')}`;
  const granted = await outcomes.send(grant(guest, grantId));
  if (granted.type !== 'access.delivered') return 1;
  const revoked = await outcomes.send(revoke(guest, grantId));
  return revoked.type === 'access.revoke_completed' ? 0 : 1;
}

async function main() {
  const connection = await amqp.connect(AMQP_URL);
  connection.on('error', () => {}); // reported by the call that failed
  try {
    return await run(connection);
  } finally {
    await connection.close().catch(() => {});
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err.message);
    process.exit(1);
  },
);
