// The plugin against a real RabbitMQ, named by MAILFERRY_TEST_AMQP_URL (skipped when unset).
'use strict'

const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const fs = require('node:fs')
const path = require('node:path')
const { describe, it, before, after } = require('node:test')

const amqplib = require('amqplib')
const constants = require('haraka-constants')
const { makePlugin, callQueue, assertOk, assertDeny } = require('haraka-test-fixtures')

const { FIXTURE, makeMailConnection, spoolRecords, tempSpool, waitFor } = require('./helpers')

const URL = process.env.MAILFERRY_TEST_AMQP_URL

// Skip each test, not the suite, so the runner counts them as skipped.
const skip = !URL && 'MAILFERRY_TEST_AMQP_URL is not set'

describe('against a real RabbitMQ', () => {
  // A private exchange per run, so a real consumer on the broker never sees these messages.
  const exchange = `mailferry.test.${crypto.randomUUID()}`
  const queue = `${exchange}.inbound`
  let admin, channel

  before(async () => {
    if (skip) return
    admin = await amqplib.connect(URL)
    channel = await admin.createChannel()
    await channel.assertExchange(exchange, 'direct', { durable: true })
    await channel.assertQueue(queue, { durable: true })
    await channel.bindQueue(queue, exchange, 'inbound')
  })

  after(async () => {
    if (skip) return
    await channel.deleteQueue(queue)
    await channel.deleteExchange(exchange)
    await admin.close()
  })

  function realPlugin(t, routing_key = 'inbound') {
    const plugin = makePlugin('mailferry')
    for (const m of ['logdebug', 'loginfo', 'logwarn', 'logerror']) plugin[m] = () => {}
    plugin.cfg.spool_dir = tempSpool(t)
    Object.assign(plugin.cfg.amqp, { url: URL, exchange, routing_key, publish_timeout: 5 })
    t.after(() => plugin.shutdown())
    return plugin
  }

  it('spools, publishes a persistent JSON message, and answers OK after the confirm', { skip }, async (t) => {
    const plugin = realPlugin(t)
    await plugin.connect()
    await waitFor(() => plugin.amqp !== null, 5000)

    const conn = makeMailConnection()
    const id = conn.transaction.uuid
    assertOk(await callQueue(plugin, conn), /queued as/)

    const msg = await channel.get(queue, { noAck: true })
    assert.ok(msg, 'a message is waiting on the bound queue')
    assert.equal(msg.properties.messageId, id)
    assert.equal(msg.properties.contentType, 'application/json')
    assert.equal(msg.properties.deliveryMode, 2)
    const body = JSON.parse(msg.content.toString('utf8'))
    assert.match(body.spool_path, /^incoming\/.+\.seg$/)
    assert.deepEqual(body.rcpt_to, ['first@example.com', 'second@example.com', 'bcc-only@example.net'])
    // The envelope record (the job as published), then the message, where the job says.
    const expected = Buffer.concat([plugin.envelope_record(body), fs.readFileSync(FIXTURE)])
    const segment = fs.readFileSync(path.join(plugin.cfg.spool_dir, body.spool_path))
    assert.deepEqual(segment.subarray(body.spool_offset), expected)
  })

  it('takes a cluster\'s URLs and publishes through the first node that answers', { skip }, async (t) => {
    const plugin = realPlugin(t)
    const dead = 'amqp://guest:guest@127.0.0.1:1/%2F' // nothing listens on port 1
    plugin.cfg.amqp.url = `${dead}, ${URL}`
    await plugin.connect()
    await waitFor(() => plugin.amqp !== null, 5000)
    const conn = makeMailConnection()
    assertOk(await callQueue(plugin, conn), /queued as/)
    const msg = await channel.get(queue, { noAck: true })
    assert.equal(msg.properties.messageId, conn.transaction.uuid)
  })

  it('drops a connection whose publish RabbitMQ nacked, and connects again', { skip }, async (t) => {
    // A queue that refuses everything: RabbitMQ nacks each publish routed to it.
    const refusing = `${exchange}.refuses`
    await channel.assertQueue(refusing, { durable: true, arguments: { 'x-max-length': 0, 'x-overflow': 'reject-publish' } })
    await channel.bindQueue(refusing, exchange, 'refuses')
    t.after(() => channel.deleteQueue(refusing))
    const plugin = realPlugin(t, 'refuses')
    plugin.cfg.amqp.reconnect_initial = 0.05
    plugin.backoff_ms = 50
    await plugin.connect()
    await waitFor(() => plugin.amqp !== null, 5000)
    const first = plugin.amqp.connection
    assertDeny(await callQueue(plugin, makeMailConnection()), /RabbitMQ: message nacked/, constants.denysoft)
    await waitFor(() => plugin.amqp !== null && plugin.amqp.connection !== first, 5000)
  })

  it('answers DENYSOFT and withdraws the record when nothing is bound to the routing key', { skip }, async (t) => {
    const plugin = realPlugin(t, 'nobody-listens-here')
    await plugin.connect()
    await waitFor(() => plugin.amqp !== null, 5000)

    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertDeny(r, /cannot route.*NO_ROUTE/, constants.denysoft)
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
  })
})
