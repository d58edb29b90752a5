// Unit tests of the mailferry queue plugin against a fake AMQP channel at the amqp_connect seam.
'use strict'

const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')
const { describe, it } = require('node:test')

const constants = require('haraka-constants')
const { callQueue, assertOk, assertDeny, assertCont } = require('haraka-test-fixtures')

const { SpoolWriter } = require('../spool_writer')
const { FIXTURE, fakeBroker, makeMailferry, makeMailConnection, spoolFiles, waitFor } = require('./helpers')

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

  it('keeps the spool file, written in full before publishing', async (t) => {
    const { broker, plugin } = await connected(t)
    const conn = makeMailConnection()
    const id = conn.transaction.uuid
    const eml = path.join(plugin.cfg.spool_dir, 'incoming', `${id}.eml`)
    let at_publish = null
    broker.channel.on_publish = () => {
      at_publish = fs.readFileSync(eml)
    }
    assertOk(await callQueue(plugin, conn))

    // The envelope record (the job as published), then the message: CRLF, un-dot-stuffed,
    // Received header kept.
    const [call] = broker.channel.published
    const record = Buffer.from(`MAILFERRY-ENVELOPE-1 ${JSON.stringify(call.body)}\r\n`)
    const expected = Buffer.concat([record, fs.readFileSync(FIXTURE)])
    assert.deepEqual(at_publish, expected, 'the consumer may read the file as soon as it is published')
    assert.deepEqual(fs.readFileSync(eml), expected)
    assert.deepEqual(call.body.rcpt_to, ['first@example.com', 'second@example.com', 'bcc-only@example.net'])
    assert.deepEqual(spoolFiles(plugin), [`${id}.eml`], 'no temporary file is left behind')
  })

  it('spools the file (fsynced and renamed) before publishing; answers after the folder fsync and the confirm', async (t) => {
    const { broker, plugin } = await connected(t)
    const conn = makeMailConnection()
    const incoming = path.join(plugin.cfg.spool_dir, 'incoming')
    const id = conn.transaction.uuid
    const ops = []
    const io = plugin.spool_io() // the real writer threads, observed from the event loop
    t.mock.method(io, 'write', async function (folder, file_id, data) {
      ops.push(`write ${file_id}`)
      const size = await SpoolWriter.prototype.write.call(this, folder, file_id, data)
      ops.push(`spooled ${fs.existsSync(path.join(folder, `${file_id}.eml`)) ? 'eml' : 'nothing'}`)
      return size
    })
    t.mock.method(io, 'sync_folder', async function (folder) {
      ops.push(`sync ${path.basename(folder)}`)
      await new Promise((r) => setTimeout(r, 30)) // a slow folder fsync
      await SpoolWriter.prototype.sync_folder.call(this, folder)
      ops.push(`synced ${path.basename(folder)}`)
    })
    broker.channel.on_publish = () => ops.push('publish')

    const answer = callQueue(plugin, conn).then((r) => {
      ops.push('answer')
      return r
    })
    assertOk(await answer)
    // The folder fsync and the publish start side by side (in either order); the answer
    // waits for the slower folder fsync.
    const folder = path.basename(incoming)
    assert.deepEqual(ops.slice(0, 2), [`write ${id}`, 'spooled eml'])
    assert.deepEqual(ops.slice(2, 4).sort(), ['publish', `sync ${folder}`])
    assert.deepEqual(ops.slice(4), [`synced ${folder}`, 'answer'])
  })

  it('shares folder fsyncs between concurrent messages, each answered after one that began after its rename', async (t) => {
    const { broker, plugin } = await connected(t)
    const events = []
    const io = plugin.spool_io()
    t.mock.method(io, 'write', async function (folder, id, data) {
      const size = await SpoolWriter.prototype.write.call(this, folder, id, data)
      events.push(`rename ${id}`) // the worker renamed it before answering
      return size
    })
    t.mock.method(io, 'sync_folder', async function (folder) {
      const n = events.filter((e) => e.startsWith('dirsync start')).length
      events.push(`dirsync start ${n}`)
      await new Promise((r) => setTimeout(r, 20)) // a slow disk: later renames pile up
      await SpoolWriter.prototype.sync_folder.call(this, folder)
      events.push(`dirsync end ${n}`)
    })
    broker.channel.on_publish = (call) => events.push(`publish ${call.body.queue_id}`)

    const conns = Array.from({ length: 8 }, () => makeMailConnection())
    const answers = conns.map((c) => callQueue(plugin, c).then((r) => {
      events.push(`answer ${c.transaction.uuid}`)
      return r
    }))
    for (const r of await Promise.all(answers)) assertOk(r)

    const syncs = events.filter((e) => e.startsWith('dirsync start')).length
    assert.ok(syncs < conns.length, `${syncs} folder fsyncs for ${conns.length} messages`)
    for (const { transaction: { uuid } } of conns) {
      const renamed = events.indexOf(`rename ${uuid}`)
      const published = events.indexOf(`publish ${uuid}`)
      const answered = events.indexOf(`answer ${uuid}`)
      assert.ok(renamed < published && published < answered, `${uuid}: ${events.join(', ')}`)
      const covered = events.some((e, i) => {
        if (!e.startsWith('dirsync start') || i < renamed) return false
        const ended = events.indexOf(e.replace('start', 'end'))
        return ended !== -1 && ended < answered
      })
      assert.ok(covered, `${uuid}: no folder fsync between its rename and its answer: ${events.join(', ')}`)
    }
  })

  it('answers DENYSOFT and removes the spool file when the folder fsync fails, even after the confirm', async (t) => {
    const { broker, plugin } = await connected(t)
    t.mock.method(plugin.spool_io(), 'sync_folder', async () => {
      await new Promise((r) => setTimeout(r, 20)) // fails after the broker confirmed
      throw Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' })
    })
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /mail queue cannot store the message/, constants.denysoft)
    assert.equal(broker.channel.published.length, 1, 'the job was published meanwhile')
    assert.deepEqual(spoolFiles(plugin), [])
  })

  it('creates the spool folder again when it was removed while Haraka runs', async (t) => {
    const { plugin } = await connected(t)
    assertOk(await callQueue(plugin, makeMailConnection()))
    fs.rmSync(path.join(plugin.cfg.spool_dir, 'incoming'), { recursive: true })
    const conn = makeMailConnection()
    assertOk(await callQueue(plugin, conn))
    assert.deepEqual(spoolFiles(plugin), [`${conn.transaction.uuid}.eml`])
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
    const { received_at, ...rest } = call.body
    assert.deepEqual(rest, {
      v: 1,
      spool_path: `incoming/${id}.eml`,
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

  it('answers DENYSOFT and removes the spool file when the broker nacks', async (t) => {
    const { plugin } = await connected(t, { mode: 'nack' })
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /did not take the message \(RabbitMQ: message nacked\)/, constants.denysoft)
    assert.deepEqual(spoolFiles(plugin), [])
  })

  it('answers DENYSOFT when the message is returned as unroutable, though its ack follows', async (t) => {
    const { plugin } = await connected(t, { mode: 'return' })
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /cannot route.*312 NO_ROUTE/, constants.denysoft)
    assert.deepEqual(spoolFiles(plugin), [])
    assert.equal(plugin.pending.size, 0)
  })

  it('answers DENYSOFT when the channel closes before confirming, then reconnects', async (t) => {
    const { broker, plugin } = await connected(t, { mode: 'close' })
    const first = broker.channel
    // Channels made from now on (the reconnect's) confirm; the first keeps closing. Set before
    // the failure: the reconnect may come (10 ms) before this test runs again on a busy machine.
    broker.mode = 'ack'
    assertDeny(await callQueue(plugin, makeMailConnection()), /channel closed/, constants.denysoft)
    assert.deepEqual(spoolFiles(plugin), [])
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
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /timeout/, constants.denysoft)
    assert.ok(Date.now() - started < 1000)
    assert.deepEqual(spoolFiles(plugin), [])
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
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /Channel closed/, constants.denysoft)
    assert.deepEqual(spoolFiles(plugin), [])
  })

  it('answers DENYSOFT and publishes nothing when the spool write fails', async (t) => {
    const { broker, plugin } = await connected(t)
    t.mock.method(plugin.spool_io(), 'write', async () => {
      throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' })
    })
    const r = await callQueue(plugin, makeMailConnection())
    assertDeny(r, /^mail queue cannot store the message, try again later$/, constants.denysoft)
    assert.deepEqual(spoolFiles(plugin), [])
    assert.equal(broker.channel.published.length, 0)
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
