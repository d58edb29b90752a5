// Unit tests of the mailferry queue plugin against a fake AMQP channel at the amqp_connect seam.
'use strict'

const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const fs = require('node:fs')
const path = require('node:path')
const { describe, it } = require('node:test')

const constants = require('haraka-constants')
const { callQueue, assertOk, assertDeny, assertCont } = require('haraka-test-fixtures')

const { SpoolWriter } = require('../spool_writer')
const { FIXTURE, fakeBroker, makeMailferry, makeMailConnection, spoolFiles, spoolRecords, waitFor } = require('./helpers')

async function connected(t, opts = {}) {
  const broker = fakeBroker()
  broker.mode = opts.mode ?? 'ack'
  const plugin = makeMailferry(t, broker, opts.cfg)
  await plugin.connect()
  assert.ok(plugin.amqp, 'plugin should be connected to the fake broker')
  return { broker, plugin }
}

describe('queue hook', () => {
  it('answers OK with the queue id after the broker acks', async (t) => {
    const { plugin } = await connected(t)
    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertOk(r, new RegExp(`^queued as ${conn.transaction.uuid.replace('.', '\\.')}$`))
  })

  it('appends the record (its envelope line, then the message) before publishing', async (t) => {
    const { broker, plugin } = await connected(t)
    const conn = makeMailConnection()
    let at_publish = null
    broker.channel.on_publish = (call) => {
      const file = path.join(plugin.cfg.spool_dir, call.body.spool_path)
      at_publish = fs.readFileSync(file).subarray(call.body.spool_offset)
    }
    assertOk(await callQueue(plugin, conn))

    // The envelope record (the job as published), then the message: CRLF, un-dot-stuffed,
    // Received header kept; the job says where the record is and the message's sha256.
    const [call] = broker.channel.published
    const record = Buffer.from(`MAILFERRY-ENVELOPE-1 ${JSON.stringify(call.body)}\r\n`)
    const message = fs.readFileSync(FIXTURE)
    assert.deepEqual(at_publish, Buffer.concat([record, message]), 'the consumer may read it as soon as it is published')
    assert.equal(call.body.sha256, crypto.createHash('sha256').update(message).digest('hex'))
    assert.deepEqual(call.body.rcpt_to, ['first@example.com', 'second@example.com', 'bcc-only@example.net'])
    const { records, withdrawn } = spoolRecords(plugin)
    assert.deepEqual(records.map((r) => [r.job, r.offset]), [[call.body, 0]])
    assert.deepEqual(withdrawn, [])
    assert.deepEqual(spoolFiles(plugin), [path.basename(call.body.spool_path)], 'one segment, nothing else')
  })

  it('publishes once the record is written and answers only after its fdatasync and the confirm', async (t) => {
    const { broker, plugin } = await connected(t)
    const ops = []
    const io = plugin.spool_io() // the real writer, observed from the event loop
    t.mock.method(io, 'kick', function () {
      if (this.syncing || !this.waiting.length) return SpoolWriter.prototype.kick.call(this)
      ops.push('sync')
      setTimeout(() => SpoolWriter.prototype.kick.call(this), 30) // a slow disk
    })
    t.mock.method(io, 'finish', function (err) {
      ops.push('durable')
      return SpoolWriter.prototype.finish.call(this, err)
    })
    broker.channel.on_publish = () => ops.push('publish')
    const answer = callQueue(plugin, makeMailConnection()).then((r) => {
      ops.push('answer')
      return r
    })
    assertOk(await answer)
    assert.deepEqual(ops, ['sync', 'publish', 'durable', 'answer'])
  })

  it('makes concurrent messages durable together, each answered after its own group', async (t) => {
    const { broker, plugin } = await connected(t)
    const io = plugin.spool_io()
    const events = []
    t.mock.method(io, 'kick', function () {
      if (this.syncing || !this.waiting.length) return SpoolWriter.prototype.kick.call(this)
      events.push(`sync ${this.waiting.length}`)
      setTimeout(() => SpoolWriter.prototype.kick.call(this), 20) // later records pile up
    })
    broker.channel.on_publish = (call) => events.push(`publish ${call.body.queue_id}`)
    const conns = Array.from({ length: 8 }, () => makeMailConnection())
    const answers = conns.map((c) => callQueue(plugin, c).then((r) => {
      events.push(`answer ${c.transaction.uuid}`)
      return r
    }))
    for (const r of await Promise.all(answers)) assertOk(r)
    assert.ok(io.seq < conns.length, `${io.seq} fdatasyncs for ${conns.length} messages: ${events.join(', ')}`)
    const { records } = spoolRecords(plugin)
    assert.deepEqual(records.map((r) => r.job.queue_id).sort(), conns.map((c) => c.transaction.uuid).sort())
    for (const record of records) {
      assert.deepEqual(record.message, fs.readFileSync(FIXTURE))
      assert.ok(events.indexOf(`publish ${record.job.queue_id}`) < events.indexOf(`answer ${record.job.queue_id}`))
    }
  })

  it('answers DENYSOFT and withdraws the record when its fdatasync fails, even after the confirm', async (t) => {
    const { broker, plugin } = await connected(t)
    t.mock.method(plugin.spool_io(), 'finish', function () {
      const err = Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' })
      setTimeout(() => SpoolWriter.prototype.finish.call(this, err), 20) // after the confirm
    })
    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertDeny(r, /mail queue cannot store the message/, constants.denysoft)
    assert.equal(broker.channel.published.length, 1, 'the job was published meanwhile')
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
    // The segment is abandoned (what reached the disk is unknown): the next record starts a new one.
    t.mock.restoreAll()
    assertOk(await callQueue(plugin, makeMailConnection()))
    assert.equal(new Set(spoolRecords(plugin).records.map((r) => r.segment)).size, 2)
  })

  it('starts a new segment when the folder or the segment was removed while Haraka runs', async (t) => {
    const { plugin } = await connected(t)
    assertOk(await callQueue(plugin, makeMailConnection()))
    fs.rmSync(path.join(plugin.cfg.spool_dir, 'incoming'), { recursive: true })
    const conn = makeMailConnection()
    assertOk(await callQueue(plugin, conn))
    assert.deepEqual(spoolRecords(plugin).records.map((r) => r.job.queue_id), [conn.transaction.uuid])
  })

  it('publishes the inbound contract with every envelope recipient', async (t) => {
    const { broker, plugin } = await connected(t)
    const conn = makeMailConnection()
    const id = conn.transaction.uuid
    const before = Date.now()
    assertOk(await callQueue(plugin, conn))

    assert.equal(broker.channel.published.length, 1)
    const [call] = broker.channel.published
    assert.equal(call.exchange, 'mailferry')
    assert.equal(call.routingKey, 'inbound')
    assert.deepEqual(call.options, {
      persistent: true,
      mandatory: true,
      contentType: 'application/json',
      messageId: id,
    })
    const { received_at, spool_path, sha256, ...rest } = call.body
    assert.match(spool_path, /^incoming\/[a-z0-9]+-\d+-\d+\.seg$/)
    assert.match(sha256, /^[0-9a-f]{64}$/)
    assert.deepEqual(rest, {
      v: 1,
      spool_offset: 0,
      queue_id: id,
      mail_from: 'sender@example.org',
      rcpt_to: ['first@example.com', 'second@example.com', 'bcc-only@example.net'],
      size: fs.statSync(FIXTURE).size,
      remote_ip: '192.0.2.7',
      helo: 'mx.example.net',
    })
    assert.match(received_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
    assert.ok(Date.parse(received_at) >= before - 1000)
  })

  it('sends the null sender as an empty mail_from', async (t) => {
    const { broker, plugin } = await connected(t)
    const conn = makeMailConnection({ mailFrom: '<>', rcptTo: ['postmaster@example.com'] })
    assertOk(await callQueue(plugin, conn))
    assert.equal(broker.channel.published[0].body.mail_from, '')
    assert.deepEqual(broker.channel.published[0].body.rcpt_to, ['postmaster@example.com'])
  })

  it('answers DENYSOFT and withdraws the record when the broker nacks', async (t) => {
    const { plugin } = await connected(t, { mode: 'nack' })
    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertDeny(r, /did not take the message \(RabbitMQ: message nacked\)/, constants.denysoft)
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
  })

  it('drops a channel that nacked and publishes the next message on a fresh one', async (t) => {
    const { broker, plugin } = await connected(t, { mode: 'nack' })
    const nacking = broker.channel
    broker.mode = 'ack' // for the channels made from now on
    assertDeny(await callQueue(plugin, makeMailConnection()), /message nacked/, constants.denysoft)
    await waitFor(() => plugin.amqp !== null && broker.attempts === 2)
    assert.notEqual(plugin.amqp.channel, nacking)
    assertOk(await callQueue(plugin, makeMailConnection()), /queued as/)
    assert.equal(nacking.published.length, 1)
    assert.equal(broker.channel.published.length, 1)
  })

  it('answers DENYSOFT when the message is returned as unroutable, though its ack follows', async (t) => {
    const { plugin } = await connected(t, { mode: 'return' })
    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertDeny(r, /cannot route.*312 NO_ROUTE/, constants.denysoft)
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
    assert.equal(plugin.pending.size, 0)
  })

  it('answers DENYSOFT when the channel closes before confirming, then reconnects', async (t) => {
    const { broker, plugin } = await connected(t, { mode: 'close' })
    const first = broker.channel
    // Channels made from now on (the reconnect's) confirm; the first keeps closing. Set before
    // the failure: the reconnect may come (10 ms) before this test runs again on a busy machine.
    broker.mode = 'ack'
    const conn = makeMailConnection()
    assertDeny(await callQueue(plugin, conn), /channel closed/, constants.denysoft)
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
    await waitFor(() => plugin.amqp !== null && broker.channel !== first)
    assertOk(await callQueue(plugin, makeMailConnection()))
  })

  it('does not blame a message for the return of another one', async (t) => {
    const { broker, plugin } = await connected(t)
    broker.channel.on_publish = () =>
      broker.channel.emit('return', {
        fields: { replyCode: 312, replyText: 'NO_ROUTE' },
        properties: { messageId: 'someone-else.1' },
      })
    assertOk(await callQueue(plugin, makeMailConnection()))
  })

  it('answers DENYSOFT when no confirm arrives in time, and ignores the late one', async (t) => {
    const { broker, plugin } = await connected(t, { mode: 'silent', cfg: { publish_timeout: 0.05 } })
    const started = Date.now()
    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertDeny(r, /timeout/, constants.denysoft)
    assert.ok(Date.now() - started < 1000)
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
    assert.equal(plugin.pending.size, 0)
    assert.equal(broker.channel.published.length, 1)
  })

  it('answers DENYSOFT without touching the spool when there is no connection', async (t) => {
    const broker = fakeBroker()
    const plugin = makeMailferry(t, broker)
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /no connection to RabbitMQ/, constants.denysoft)
    assert.deepEqual(spoolFiles(plugin), [])
  })

  it('answers DENYSOFT when the channel dies between spooling and publishing', async (t) => {
    const { broker, plugin } = await connected(t)
    broker.channel.publish = () => {
      throw new Error('Channel closed')
    }
    const conn = makeMailConnection()
    const r = await callQueue(plugin, conn)
    assertDeny(r, /Channel closed/, constants.denysoft)
    assert.deepEqual(spoolRecords(plugin).withdrawn, [conn.transaction.uuid])
  })

  it('answers DENYSOFT and publishes nothing when the spool write fails', async (t) => {
    const { broker, plugin } = await connected(t)
    t.mock.method(fs, 'writeSync', () => {
      throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' })
    })
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /^mail queue cannot store the message, try again later$/, constants.denysoft)
    assert.equal(broker.channel.published.length, 0)
    t.mock.restoreAll()
    assertOk(await callQueue(plugin, makeMailConnection())) // in a new segment
  })

  it('answers DENYSOFT when the spool folder cannot be created', async (t) => {
    const { plugin } = await connected(t)
    const blocker = path.join(plugin.cfg.spool_dir, 'not-a-folder')
    fs.writeFileSync(blocker, '')
    plugin.cfg.spool_dir = blocker
    assertDeny(await callQueue(plugin, makeMailConnection()), /cannot store/, constants.denysoft)
  })

  it('answers DENYSOFT at once while the broker blocks publishers', async (t) => {
    const { broker, plugin } = await connected(t)
    broker.connection.emit('blocked', 'low on disk')
    assertDeny(await callQueue(plugin, makeMailConnection()), /low on disk/, constants.denysoft)
    broker.connection.emit('unblocked')
    assertOk(await callQueue(plugin, makeMailConnection()))
  })

  it('steps aside when the transaction wants another queue', async (t) => {
    const { broker, plugin } = await connected(t)
    const conn = makeMailConnection()
    conn.transaction.notes.set('queue.wants', 'smtp_forward')
    assertCont(await callQueue(plugin, conn))
    assert.equal(broker.channel.published.length, 0)
  })
})

describe('connection lifecycle', () => {
  it('gives 4xx while the broker is down at start, then 250 once it appears, without a restart', async (t) => {
    const broker = fakeBroker()
    broker.down = true
    const plugin = makeMailferry(t, broker)
    await plugin.hook_init_master(() => {}, {}) // single process: the master connects
    await waitFor(() => broker.attempts >= 2)
    assertDeny(await callQueue(plugin, makeMailConnection()), /no connection/, constants.denysoft)

    broker.down = false
    await waitFor(() => plugin.amqp !== null)
    assertOk(await callQueue(plugin, makeMailConnection()))
  })

  it('survives an error event and reconnects after the connection drops', async (t) => {
    const { broker, plugin } = await connected(t)
    const first = broker.connection
    broker.down = true
    first.emit('error', new Error('Heartbeat timeout')) // would crash Haraka without a listener
    first.emit('close')
    broker.channel.emit('close') // both close on a broker loss; act once
    assert.equal(plugin.amqp, null)
    assertDeny(await callQueue(plugin, makeMailConnection()), /no connection/, constants.denysoft)

    broker.down = false
    await waitFor(() => plugin.amqp !== null)
    assert.notEqual(broker.connection, first)
    assertOk(await callQueue(plugin, makeMailConnection()))
  })

  it('drops the connection and starts over when only the channel dies', async (t) => {
    const { broker, plugin } = await connected(t)
    const first = broker.connection
    broker.channel.emit('error', new Error('PRECONDITION_FAILED - inequivalent arg'))
    broker.channel.emit('close')
    assert.equal(first.closed, true)
    await waitFor(() => plugin.amqp !== null && broker.connection !== first)
    assertOk(await callQueue(plugin, makeMailConnection()))
  })

  it('backs off exponentially up to the configured maximum', async (t) => {
    const broker = fakeBroker()
    broker.down = true
    const plugin = makeMailferry(t, broker, { reconnect_initial: 0.01, reconnect_max: 0.04 })
    const delays = []
    const realSchedule = plugin.schedule_reconnect
    plugin.schedule_reconnect = function () {
      if (!this.reconnect_timer) delays.push(this.backoff_ms)
      return realSchedule.call(this)
    }
    await plugin.connect()
    await waitFor(() => delays.length >= 5)
    assert.deepEqual(delays.slice(0, 5), [10, 20, 40, 40, 40])

    broker.down = false
    await waitFor(() => plugin.amqp !== null)
    assert.equal(plugin.backoff_ms, 10, 'a successful connect resets the backoff')
  })

  it('connects in cluster workers, not in the cluster master', async (t) => {
    const broker = fakeBroker()
    const plugin = makeMailferry(t, broker)
    plugin.hook_init_master(() => {}, { cluster: {} })
    await new Promise((r) => setImmediate(r))
    assert.equal(broker.attempts, 0)
    plugin.hook_init_child(() => {}, {})
    await waitFor(() => plugin.amqp !== null)
  })

  it('closes the connection on shutdown and stops reconnecting', async (t) => {
    const { broker, plugin } = await connected(t)
    plugin.shutdown()
    assert.equal(broker.connection.closed, true)
    const attempts = broker.attempts
    await new Promise((r) => setTimeout(r, 60))
    assert.equal(broker.attempts, attempts)
    assert.equal(plugin.amqp, null)
  })
})

describe('configuration', () => {
  it('reads its defaults from config/mailferry.ini', (t) => {
    const plugin = makeMailferry(t, fakeBroker())
    plugin.load_config()
    assert.deepEqual(plugin.cfg.amqp, {
      url: 'amqp://guest:guest@127.0.0.1:5672/%2F',
      exchange: 'mailferry',
      routing_key: 'inbound',
      publish_timeout: 10,
      reconnect_initial: 1,
      reconnect_max: 30,
      heartbeat: 30,
    })
    assert.equal(plugin.cfg.spool_dir, path.resolve('var/spool'))
  })
})
