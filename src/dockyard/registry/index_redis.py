"""The metadata index in Redis: what :class:`~dockyard.registry.index.MetadataIndex` keeps in
a SQLite file per host, shared here by every worker of every instance of an S3 + Redis
deployment (``redis.addr``; ``index.backend``, ``registry.configured.open_index``). Same
interface, same semantics; read :mod:`dockyard.registry.index` first.

Keys. Every key of one store's index starts ``dockyard:index:{<store id>}:``, the store id
being written once in the store (``/dockyard/index-id``), so that registries sharing a Redis
keep apart and an emptied store starts a new index; the braces make it a Redis Cluster hash tag
(every key of one index in one slot, so the scripts below may touch any of them). Under it:

- ``repos`` (sorted set, score 0, ordered by name): every indexed repository;
  ``listed``: those with at least one manifest (``repositories()`` pages it with
  ``ZRANGEBYLEX ... LIMIT``); ``bytags``, ``bysize``, ``bypushed``: the same scored by their
  number of tags, size and latest tag push (-inf without tags), which ``repositories_sorted``
  pages by rank (``ranked`` notes that they hold every listed repository: see ``_RANK``);
  ``uploading``: those with reservations; ``stale`` (set): those a failed write left for the
  next verification;
- per repository ``r:<name>:``: ``tags`` (sorted set of names, for O(page) ``ZRANGEBYLEX``
  paging), ``tagdigest``/``tagpushed`` (hashes tag -> digest / push time), ``manifests``
  (digest -> JSON of the record's fixed fields), ``mpushed``/``pulled`` (digest -> time),
  ``blobs`` (digest -> size), ``sum`` (its aggregates: ``size``, the sum of its blobs', and
  ``pushed``, its latest tag push), ``uploads`` (upload id -> bytes reserved) and ``v``, a
  version stamped from a global clock by every write (see refreshes below);
- per scope a reservation named (``scopes``, a sorted set scored by the last such
  reservation) its tally ``s:<scope>:``: ``refs`` (digest -> repositories of the scope using
  it), ``sizes`` (digest -> size) and ``bytes`` (their sum); ``building``/``recounting``
  (hashes scope -> the last repository counted) while a tally or its shadow ``n:<scope>:`` is
  being counted (see quotas below);
- ``orphans``: reservations whose upload session verification found gone (see below);
  ``verified``/``verifying``: the verification schedule shared by the instances.

Times are stored as Python's ``repr`` of the float and compared in Lua with ``tonumber``, so
they round-trip exactly (Lua's own number formatting keeps 14 digits, not enough for
microseconds since 1970).

Every write is one Lua script, so it is atomic against every other worker and instance, and
reads that need a consistent view are scripts too (a page of tags, a summary, a scope's usage).

Quotas. :meth:`RedisIndex.reserve` is one script: for each scope it reads the scope's tally
(its distinct blobs, each once at its largest size) and sums the scope's reservations, checks
the limit and records the upload's new total, while no other command runs. Every write that
changes a repository's blobs updates the tallies of the scopes holding it in the same script,
so a tally is always the union of the scope's blob entries (verification's recount checks it;
the only difference it can correct is a blob whose larger recorded size went, which the tally
keeps meanwhile: the safe side). A push counts its bytes first as a reservation (before they
are read) and then as the repository's blob (the link is indexed before the reservation is
released, ``registry.uploads``; in between they count twice, again the safe side), so at every
instant every byte on its way into the store is counted: concurrent pushes through any number
of workers and instances never take a scope over its limit. **The overshoot bound is 0 bytes**,
while Redis answers. What can still let a scope pass its limit, and by how much:

- an index write that fails between a reservation and the link it precedes (Redis unreachable
  for that moment; the reservation is then released or verification forgets it): the size of
  the blobs whose link was not recorded, until the next verification counts them;
- Redis losing its data (a restart without persistence): the index is then empty and every
  instance notices within ``VERIFY_TICK`` seconds (the ``verified`` key is gone) and one of them
  rebuilds it; until that rebuild completes, usage counts only what arrived since.

Refreshes never lose a concurrent push: a refresh notes the repository's version before it
reads the layout, and replaces the entry only if no write came in between (else it reads again;
after three tries it only adds what the layout has and leaves the repository stale for the next
verification). Verification forgets a repository gone from the layout only if no write came
since it listed the index, and forgets the reservation of an upload whose session is gone only
when the session was gone at the verification before too: an upload being committed, whose
session directory is deleted just before its blob is linked, keeps its bytes counted.

Cost: a reservation costs O(tallied scopes + repositories of its scopes with uploads in
progress) (0.3 ms measured, whatever the scope's size); a write O(its blobs x tallied scopes
holding the repository). A tally is counted when a reservation first names its scope, and
recounted by each verification, in steps of ``TALLY_BUDGET`` blob entries (about 0.1 s of
Redis each), repositories in name order: writes update it only for the repositories counted
so far, and a recount goes into a shadow that writes keep too and that replaces the tally when
complete, so no script blocks Redis for long and reservations never wait for a recount (only
the first reservation of a scope waits for its first count: about 1 s per 100 000 blob
entries). A page of tags costs ``ZRANGEBYLEX`` with ``LIMIT`` and ``HMGET`` of the page,
whatever the number of tags.

Pulls are kept in memory per worker and written every ``index.pullflush`` seconds in one script
that keeps the latest time, so every instance sees every pull after at most that long.
Verification runs once per interval for the whole deployment: whichever worker 0 finds no
``verified`` key takes the ``verifying`` lease (``SET NX PX``, renewed while it runs) and sets
``verified`` (expiring after ``index.verifyinterval``) when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import RedisError

from dockyard.oci.digest import Digest
from dockyard.registry import inventory, layout
from dockyard.registry.cache import read_token
from dockyard.registry.index import (
    TRANSIENT,
    QuotaExceeded,
    RepositorySummary,
    Usage,
    _glance,
    _read_layout,
    checked_key,
    same_as_layout,
)
from dockyard.registry.records import (
    ManifestRecord,
    RepositoryKey,
    RepositorySnapshot,
    TagRecord,
)
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store

log = logging.getLogger("dockyard.index")

#: how often each instance's verifier looks whether a verification is due (or the index lost)
VERIFY_TICK = 10.0
#: the verification lease: held this long, renewed every third of it while verifying
LEASE_MS = 30_000
#: a transient reservation (one request: a mount, a manifest) older than this was left by a
#: server that died during the request
TRANSIENT_MAX_AGE = 3600.0
#: refreshes that lost a race with a write before the layout is merged in instead
REFRESH_TRIES = 3
#: a scope's tally is dropped when no reservation named it for this long (its quota removed)
SCOPE_IDLE = 7 * 86400.0
#: blob entries a tally counts per script, so that counting a large scope never blocks Redis
#: for long (about 0.06 s measured)
TALLY_BUDGET = 10_000
#: what ``ranked`` holds once the sorted sets by column hold every listed repository (a new
#: value makes every index score its repositories again)
RANKED = "1"
#: repositories scored per script while they are (see ``_RANK``)
RANK_BUDGET = 500

# -- the scripts -------------------------------------------------------------------------------
# ARGV[1] is always the key prefix; KEYS[1] its ``repos`` key, so that a cluster client routes
# the script to the index's slot.

_LIB = """
local P = ARGV[1]
-- fields per HMGET/HSET: Lua's unpack() takes about 8000 values at most
local CHUNK = 1000
local function key(name, kind) return P .. 'r:' .. name .. ':' .. kind end
-- a Lua number as an integer string ('%.14g', Lua's own, writes 1e+15)
local function int(n) return string.format('%.0f', n) end
local function stamp(name)
  redis.call('SET', key(name, 'v'), redis.call('INCR', P .. 'clock'))
end
local function hash(k)
  local flat, t = redis.call('HGETALL', k), {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function hmget(k, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local part = {}
    for j = i, math.min(i + CHUNK - 1, #fields) do part[#part + 1] = fields[j] end
    local got = redis.call('HMGET', k, unpack(part))
    for n = 1, #part do out[#out + 1] = got[n] end
  end
  return out
end
local function holds(scope, name)
  if scope == '*' then return true end
  if string.sub(scope, -2) == '/*' then
    local prefix = string.sub(scope, 1, -2)
    return string.sub(name, 1, #prefix) == prefix
  end
  return scope == name
end
local function members(set, scope)
  if scope == '*' then return redis.call('ZRANGE', P .. set, 0, -1) end
  if string.sub(scope, -2) == '/*' then
    local prefix = string.sub(scope, 1, -2)
    -- every name from 'ns/' up to (not including) 'ns0': '0' follows '/'
    return redis.call('ZRANGEBYLEX', P .. set, '[' .. prefix,
                      '(' .. string.sub(prefix, 1, -2) .. '0')
  end
  if redis.call('ZSCORE', P .. set, scope) then return {scope} end
  return {}
end

-- The distinct blobs of a scope counted from every repository's blobs: digest -> repositories
-- using it, digest -> its largest size, and their total (what a scope without a tally costs).
local function count_scope(scope)
  local sizes, bytes, count = {}, 0, 0
  for _, name in ipairs(members('repos', scope)) do
    local flat = redis.call('HGETALL', key(name, 'blobs'))
    for i = 1, #flat, 2 do
      local digest, size = flat[i], tonumber(flat[i + 1])
      local old = sizes[digest]
      if old == nil then
        sizes[digest] = size; bytes = bytes + size; count = count + 1
      elseif size > old then
        sizes[digest] = size; bytes = bytes + size - old
      end
    end
  end
  return bytes, count
end

-- Tallies. For each scope that reservations name (the sorted set ``scopes``, scored by its last
-- reservation) the same kept up to date under s:<scope>: refs (digest -> repositories using it),
-- sizes (digest -> largest size) and bytes (their sum), so that a reservation reads a counter,
-- not every blob. Every change to a repository's blobs goes through put_blob and drop_blobs,
-- which update the tallies of the scopes holding the repository.
--
-- A tally is counted in steps (tally_step), repositories in name order, so that no script
-- blocks Redis for long: the hash ``building`` holds the last repository counted so far, and
-- a write updates the tally only for repositories up to there (the rest are counted when the
-- step reaches them). Verification recounts the same way into a shadow (n:<scope>:, cursor in
-- ``recounting``) that writes keep too, and swaps it in when complete: what writes kept right
-- is unchanged, what drifted is corrected, and reservations never wait.
local function live(scope) return P .. 's:' .. scope .. ':' end
local function shadow(scope) return P .. 'n:' .. scope .. ':' end
-- a <= b byte by byte, as sorted sets order names (Lua's own comparison follows the locale)
local function upto(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
local function bounds(scope)
  if scope == '*' then return '-', '+' end
  if string.sub(scope, -2) == '/*' then
    local prefix = string.sub(scope, 1, -2)
    return '[' .. prefix, '(' .. string.sub(prefix, 1, -2) .. '0'
  end
  return '[' .. scope, '[' .. scope
end
-- the tallies (key bases) a change to the blobs of repository ``name`` must update
local function tallies(name)
  local out = {}
  for _, scope in ipairs(redis.call('ZRANGE', P .. 'scopes', 0, -1)) do
    if holds(scope, name) then
      local cursor = redis.call('HGET', P .. 'building', scope)
      if not cursor or upto(name, cursor) then out[#out + 1] = live(scope) end
      cursor = redis.call('HGET', P .. 'recounting', scope)
      if cursor and upto(name, cursor) then out[#out + 1] = shadow(scope) end
    end
  end
  return out
end
local function ready(scope)
  return redis.call('ZSCORE', P .. 'scopes', scope) and
         redis.call('HEXISTS', P .. 'building', scope) == 0
end
local function tally_add(bases, digest, size)
  for _, base in ipairs(bases) do
    redis.call('HINCRBY', base .. 'refs', digest, 1)
    local old = redis.call('HGET', base .. 'sizes', digest)
    if not old then
      redis.call('HSET', base .. 'sizes', digest, size)
      redis.call('INCRBY', base .. 'bytes', size)
    elseif tonumber(size) > tonumber(old) then
      redis.call('HSET', base .. 'sizes', digest, size)
      redis.call('INCRBY', base .. 'bytes', int(tonumber(size) - tonumber(old)))
    end
  end
end
-- A repository's entry for a blob changed size: the tally keeps the larger (a smaller one
-- waits for the next recount: counting more is the safe side).
local function tally_resize(bases, digest, size)
  for _, base in ipairs(bases) do
    local old = redis.call('HGET', base .. 'sizes', digest)
    if old and tonumber(size) > tonumber(old) then
      redis.call('HSET', base .. 'sizes', digest, size)
      redis.call('INCRBY', base .. 'bytes', int(tonumber(size) - tonumber(old)))
    end
  end
end
local function tally_remove(bases, digest)
  for _, base in ipairs(bases) do
    if redis.call('HINCRBY', base .. 'refs', digest, -1) <= 0 then
      redis.call('HDEL', base .. 'refs', digest)
      local old = redis.call('HGET', base .. 'sizes', digest)
      if old then
        redis.call('HDEL', base .. 'sizes', digest)
        redis.call('DECRBY', base .. 'bytes', old)
      end
    end
  end
end
-- keep: an entry the repository has already stays as it is (a manifest's claim of a size)
-- (the caller makes sure the repository's aggregates are counted first: see counted)
local function put_blob(bases, name, digest, size, keep)
  local old = redis.call('HGET', key(name, 'blobs'), digest)
  if old and (keep or old == size) then return end
  redis.call('HSET', key(name, 'blobs'), digest, size)
  if old then tally_resize(bases, digest, size) else tally_add(bases, digest, size) end
  redis.call('HINCRBY', key(name, 'sum'), 'size', int(tonumber(size) - tonumber(old or '0')))
end
local function drop_blobs(name)
  local bases = tallies(name)
  if #bases > 0 then
    for digest, _ in pairs(hash(key(name, 'blobs'))) do tally_remove(bases, digest) end
  end
  redis.call('DEL', key(name, 'blobs'))
end

local function uploading_in(scope)
  local total = 0
  for _, name in ipairs(members('uploading', scope)) do
    for _, v in ipairs(redis.call('HVALS', key(name, 'uploads'))) do total = total + tonumber(v) end
  end
  return total
end
-- bytes and count of the distinct blobs of a scope: its tally's if it has one
local function blob_usage(scope)
  if ready(scope) then
    return tonumber(redis.call('GET', live(scope) .. 'bytes') or '0'),
           redis.call('HLEN', live(scope) .. 'refs')
  end
  return count_scope(scope)
end
local function uses(scope, digest)
  if ready(scope) then return redis.call('HEXISTS', live(scope) .. 'refs', digest) == 1 end
  for _, name in ipairs(members('repos', scope)) do
    if redis.call('HEXISTS', key(name, 'blobs'), digest) == 1 then return true end
  end
  return false
end
local function latest(k)
  local best, text = nil, false
  for _, v in ipairs(redis.call('HVALS', k)) do
    local n = tonumber(v)
    if best == nil or n > best then best, text = n, v end
  end
  return text
end

-- A repository's aggregates, r:<name>:sum: ``size`` (the sum of its blobs' sizes) and
-- ``pushed`` (its latest tag push; absent without tags), kept by every write; for the listed
-- repositories, mirrored as the scores of the sorted sets bytags, bysize and bypushed (-inf
-- without tags), which order them by (score, name) for repositories_sorted.
local function blob_bytes(name)
  local size = 0
  for _, v in ipairs(redis.call('HVALS', key(name, 'blobs'))) do size = size + tonumber(v) end
  return size
end
local function recount_pushed(name)
  local pushed = latest(key(name, 'tagpushed'))
  if pushed then redis.call('HSET', key(name, 'sum'), 'pushed', pushed)
  else redis.call('HDEL', key(name, 'sum'), 'pushed') end
end
local function recount(name)
  redis.call('HSET', key(name, 'sum'), 'size', int(blob_bytes(name)))
  recount_pushed(name)
end
-- Before a write changes them step by step: counted if they are not (a repository written by
-- a version of Dockyard without them).
local function counted(name)
  if redis.call('HEXISTS', key(name, 'sum'), 'size') == 0 then recount(name) end
end
local function grow(name, delta)
  if delta ~= 0 then redis.call('HINCRBY', key(name, 'sum'), 'size', int(delta)) end
end
-- a tag of ``name`` now pushed at ``pushed`` that was pushed at ``old`` (nil: a new tag)
local function tag_pushed(name, old, pushed)
  local last = redis.call('HGET', key(name, 'sum'), 'pushed')
  if not last or tonumber(pushed) > tonumber(last) then
    redis.call('HSET', key(name, 'sum'), 'pushed', pushed)
  elseif old and tonumber(old) >= tonumber(last) and tonumber(pushed) < tonumber(old) then
    recount_pushed(name)
  end
end
-- a tag that was pushed at ``old`` is gone
local function tag_gone(name, old)
  local last = redis.call('HGET', key(name, 'sum'), 'pushed')
  if last and tonumber(old) >= tonumber(last) then recount_pushed(name) end
end
local function unlist(name)
  for _, set in ipairs({'listed', 'bytags', 'bysize', 'bypushed'}) do
    redis.call('ZREM', P .. set, name)
  end
end
-- after every write: listed (with its scores) if it has a manifest, else not
local function listed(name)
  if redis.call('HLEN', key(name, 'manifests')) == 0 then return unlist(name) end
  counted(name)
  local sum = redis.call('HMGET', key(name, 'sum'), 'size', 'pushed')
  redis.call('ZADD', P .. 'listed', 0, name)
  redis.call('ZADD', P .. 'bytags', redis.call('ZCARD', key(name, 'tags')), name)
  redis.call('ZADD', P .. 'bysize', sum[1], name)
  redis.call('ZADD', P .. 'bypushed', sum[2] or '-inf', name)
end
local function summary(name)
  local sum = redis.call('HMGET', key(name, 'sum'), 'size', 'pushed')
  local size, pushed = sum[1], sum[2]
  if not size then  -- not counted yet (see counted): counted here, without writing
    size, pushed = blob_bytes(name), latest(key(name, 'tagpushed'))
  end
  return {name, redis.call('ZCARD', key(name, 'tags')), pushed,
          redis.call('HLEN', key(name, 'manifests')), latest(key(name, 'pulled')), size}
end
"""

# ARGV: P, name, digest, record JSON, pushed, pulled or '', tag count, tags..., blob/size pairs
_PUSH = """
local name, digest, pushed = ARGV[2], ARGV[3], ARGV[5]
redis.call('ZADD', P .. 'repos', 'NX', 0, name)
stamp(name)
counted(name)
-- a manifest pushed again keeps its first push and its last pull
if redis.call('HSETNX', key(name, 'manifests'), digest, ARGV[4]) == 1 then
  redis.call('HSET', key(name, 'mpushed'), digest, pushed)
  if ARGV[6] ~= '' then redis.call('HSET', key(name, 'pulled'), digest, ARGV[6]) end
end
local ntags = tonumber(ARGV[7])
for i = 8, 7 + ntags do
  local old = redis.call('HGET', key(name, 'tagpushed'), ARGV[i])
  redis.call('ZADD', key(name, 'tags'), 0, ARGV[i])
  redis.call('HSET', key(name, 'tagdigest'), ARGV[i], digest)
  redis.call('HSET', key(name, 'tagpushed'), ARGV[i], pushed)
  tag_pushed(name, old, pushed)
end
local bases = tallies(name)
for i = 8 + ntags, #ARGV, 2 do put_blob(bases, name, ARGV[i], ARGV[i + 1], true) end
listed(name)
"""

# ARGV: P, name, digest, size. The stored size is the truth: it replaces a descriptor's claim.
_LINK = """
redis.call('ZADD', P .. 'repos', 'NX', 0, ARGV[2])
stamp(ARGV[2])
counted(ARGV[2])
put_blob(tallies(ARGV[2]), ARGV[2], ARGV[3], ARGV[4], false)
listed(ARGV[2])
"""

# ARGV: P, name, tag
_UNTAG = """
local name, tag = ARGV[2], ARGV[3]
stamp(name)
local old = redis.call('HGET', key(name, 'tagpushed'), tag)
if old then counted(name) end
redis.call('ZREM', key(name, 'tags'), tag)
redis.call('HDEL', key(name, 'tagdigest'), tag)
redis.call('HDEL', key(name, 'tagpushed'), tag)
if old then
  tag_gone(name, old)
  listed(name)
end
"""

# ARGV: P, name, digest. Tags are found by a scan of the repository's tags, as registry:2
# itself does on a manifest delete: deletes are rare, tag listings are not.
_DROP_MANIFEST = """
local name, digest = ARGV[2], ARGV[3]
stamp(name)
local flat = redis.call('HGETALL', key(name, 'tagdigest'))
local untagged = false
for i = 1, #flat, 2 do
  if flat[i + 1] == digest then
    redis.call('ZREM', key(name, 'tags'), flat[i])
    redis.call('HDEL', key(name, 'tagdigest'), flat[i])
    redis.call('HDEL', key(name, 'tagpushed'), flat[i])
    untagged = true
  end
end
redis.call('HDEL', key(name, 'manifests'), digest)
redis.call('HDEL', key(name, 'mpushed'), digest)
redis.call('HDEL', key(name, 'pulled'), digest)
if untagged and redis.call('HEXISTS', key(name, 'sum'), 'size') == 1 then
  recount_pushed(name)  -- the tags were read already: as cheap as working out whether to
end
listed(name)
"""

# ARGV: P, name, 'if' and the version it must still have ('' for none) or 'always', with its
# uploads ('1') or not ('0'). Returns 1 if the repository was dropped, 0 if a write came since.
_DROP_REPOSITORY = """
local name = ARGV[2]
if ARGV[3] == 'if' and (redis.call('GET', key(name, 'v')) or '') ~= ARGV[4] then return 0 end
drop_blobs(name)
for _, kind in ipairs({'tags', 'tagdigest', 'tagpushed', 'manifests', 'mpushed', 'pulled', 'v',
                       'sum'}) do
  redis.call('DEL', key(name, kind))
end
redis.call('ZREM', P .. 'repos', name)
unlist(name)
redis.call('SREM', P .. 'stale', name)
if ARGV[5] == '1' then
  redis.call('DEL', key(name, 'uploads'))
  redis.call('ZREM', P .. 'uploading', name)
end
return 1
"""

# ARGV: P, then name/digest/time triples. Only manifests still indexed; the latest time wins.
_PULLS = """
for i = 2, #ARGV, 3 do
  local name, digest, when = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HEXISTS', key(name, 'manifests'), digest) == 1 then
    local old = redis.call('HGET', key(name, 'pulled'), digest)
    if not old or tonumber(old) < tonumber(when) then
      redis.call('HSET', key(name, 'pulled'), digest, when)
    end
  end
end
"""

# ARGV: P, name, digest, time
_SET_PULLED = """
if redis.call('HEXISTS', key(ARGV[2], 'manifests'), ARGV[3]) == 1 then
  redis.call('HSET', key(ARGV[2], 'pulled'), ARGV[3], ARGV[4])
end
"""

# ARGV: P, name. Marks the repository for the next verification.
_STALE = """
redis.call('ZADD', P .. 'repos', 'NX', 0, ARGV[2])
redis.call('SADD', P .. 'stale', ARGV[2])
"""

# ARGV: P, name, upload, total, digest or '', now, then scope/limit pairs. Returns nil, or
# {scope, limit, used, wanted} of the first scope it would take over its limit, or
# {'count', scope} (nothing changed) for a scope whose tally is not counted yet.
_RESERVE = """
local name, upload, total, digest = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local before = tonumber(redis.call('HGET', key(name, 'uploads'), upload) or '0')
for i = 7, #ARGV, 2 do
  if not ready(ARGV[i]) then return {'count', ARGV[i]} end
end
for i = 7, #ARGV, 2 do
  local scope, limit = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZADD', P .. 'scopes', ARGV[6], scope)
  local wanted = total
  if digest ~= '' and uses(scope, digest) then wanted = 0 end
  local used = blob_usage(scope) + uploading_in(scope) - before
  if used + wanted > limit then return {scope, limit, used, wanted} end
end
redis.call('HSET', key(name, 'uploads'), upload, ARGV[4])
redis.call('ZADD', P .. 'uploading', 0, name)
return false
"""

# ARGV: P, name, upload, total or '' (no longer counted)
_RELEASE = """
local name, upload = ARGV[2], ARGV[3]
if ARGV[4] == '' then
  redis.call('HDEL', key(name, 'uploads'), upload)
  if redis.call('HLEN', key(name, 'uploads')) == 0 then
    redis.call('ZREM', P .. 'uploading', name)
  end
else
  redis.call('HSET', key(name, 'uploads'), upload, ARGV[4])
  redis.call('ZADD', P .. 'uploading', 0, name)
end
"""

# ARGV: P, name, after ('' for the start), limit. O(page): a seek in the sorted set and HMGETs
# of the page.
_TAGS = """
local name, after, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
local low = '-'
if after ~= '' then low = '(' .. after end
local tags = redis.call('ZRANGEBYLEX', key(name, 'tags'), low, '+', 'LIMIT', 0, limit)
if #tags == 0 then return {} end
local digests = hmget(key(name, 'tagdigest'), tags)
local pushed = hmget(key(name, 'tagpushed'), tags)
local known = {}
for n = 1, #tags do if digests[n] then known[#known + 1] = digests[n] end end
local pulled = {}
if #known > 0 then
  local times = hmget(key(name, 'pulled'), known)
  for n = 1, #known do pulled[known[n]] = times[n] end
end
local out = {}
for n = 1, #tags do
  if digests[n] then
    out[#out + 1] = {tags[n], digests[n], pushed[n], pulled[digests[n]] or false}
  end
end
return out
"""

# ARGV: P, after, limit (-1: all). Summaries of the repositories with manifests after ``after``.
_REPOSITORIES = """
local low = '-'
if ARGV[2] ~= '' then low = '(' .. ARGV[2] end
local out = {}
for _, name in ipairs(redis.call('ZRANGEBYLEX', P .. 'listed', low, '+', 'LIMIT', 0,
                                 tonumber(ARGV[3]))) do
  out[#out + 1] = summary(name)
end
return out
"""

# ARGV: P, sort ('name', 'tags', 'size' or 'pushed'), '1' for descending or '', the key to
# start after ('' for none: the score as text, '-inf' for a repository without tags, and the
# name), count, '1' for summaries or '' for names and scores. Up to ``count`` listed
# repositories in order after the key: {name, score, ...} (score '' by name), or summaries.
#
# By name: ZRANGEBYLEX (or ZREVRANGEBYLEX) of ``listed`` with LIMIT. Else the sorted set of the
# sort orders by (score, name) (Redis orders equal scores by name): the seek is the rank of
# the key, from ZCOUNT (the ranks of its score) and a binary search by name among the
# repositories of that score (ZRANGE of one rank per step): O(log^2 N), and the page ZRANGE of
# ranks, O(log N + page). Repositories without tags (bypushed's -inf, ranks [0, nulls)) come
# after the others in both directions.
_SORTED = """
local sort, desc, count = ARGV[2], ARGV[3] == '1', tonumber(ARGV[7])
local has_key, score, after = ARGV[4] == '1', ARGV[5], ARGV[6]
local out = {}
local function emit(name, value)
  if ARGV[8] == '1' then out[#out + 1] = summary(name)
  else out[#out + 1] = name; out[#out + 1] = value end
end
if sort == 'name' then
  local names
  if desc then
    local high = '+'
    if has_key then high = '(' .. after end
    names = redis.call('ZREVRANGEBYLEX', P .. 'listed', high, '-', 'LIMIT', 0, count)
  else
    local low = '-'
    if has_key then low = '(' .. after end
    names = redis.call('ZRANGEBYLEX', P .. 'listed', low, '+', 'LIMIT', 0, count)
  end
  for _, name in ipairs(names) do emit(name, '') end
  return out
end
local Z = P .. 'by' .. sort
-- the rank of the first member above the key (at or above it if ``at``)
local function rank(at)
  local lo = redis.call('ZCOUNT', Z, '-inf', '(' .. score)
  local hi = redis.call('ZCOUNT', Z, '-inf', score)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local member = redis.call('ZRANGE', Z, mid, mid)[1]
    local below = upto(member, after)
    if at and member == after then below = false end
    if below then lo = mid + 1 else hi = mid end
  end
  return lo
end
local total = redis.call('ZCARD', Z)
local nulls = 0
if sort == 'pushed' then nulls = redis.call('ZCOUNT', Z, '-inf', '-inf') end
-- the ranges of ranks [lo, hi) to read, in listing order
local ranges
if not has_key then
  ranges = {{nulls, total}, {0, nulls}}
elseif desc then
  local stop = rank(true)
  if score == '-inf' then ranges = {{0, stop}} else ranges = {{nulls, stop}, {0, nulls}} end
else
  local start = rank(false)
  if score == '-inf' then ranges = {{start, nulls}} else ranges = {{start, total}, {0, nulls}} end
end
local left = count
for _, range in ipairs(ranges) do
  local lo, hi = range[1], range[2]
  if left <= 0 then break end
  if hi > lo then
    if desc then lo = math.max(lo, hi - left) else hi = math.min(hi, lo + left) end
    local flat = redis.call('ZRANGE', Z, lo, hi - 1, 'WITHSCORES')
    local first, last, step = 1, #flat - 1, 2
    if desc then first, last, step = #flat - 1, 1, -2 end
    for i = first, last, step do emit(flat[i], flat[i + 1]) end
    left = left - (hi - lo)
  end
end
return out
"""

# ARGV: P, after ('' for the start), count. Scores the next ``count`` listed repositories after
# ``after`` (by name) in the sorted sets by column, counting their aggregates if they are not:
# what an index written before those existed lacks. Returns the last name, or '' at the end
# (then ``ranked`` notes it done).
_RANK = """
local low = '-'
if ARGV[2] ~= '' then low = '(' .. ARGV[2] end
local names = redis.call('ZRANGEBYLEX', P .. 'listed', low, '+', 'LIMIT', 0, tonumber(ARGV[3]))
for _, name in ipairs(names) do listed(name) end
if #names < tonumber(ARGV[3]) then
  redis.call('SET', P .. 'ranked', ARGV[4])
  return ''
end
return names[#names]
"""

# ARGV: P, then names. Summaries of those that have manifests.
_SUMMARIES = """
local out = {}
for i = 2, #ARGV do
  if redis.call('HLEN', key(ARGV[i], 'manifests')) > 0 then out[#out + 1] = summary(ARGV[i]) end
end
return out
"""

# ARGV: P, name
_REPOSITORY = """
if redis.call('HLEN', key(ARGV[2], 'manifests')) == 0 then return false end
return summary(ARGV[2])
"""

# ARGV: P, scope
_USAGE = """
local scope = ARGV[2]
local bytes, count = blob_usage(scope)
local repos = 0
for _, name in ipairs(members('repos', scope)) do
  if redis.call('EXISTS', key(name, 'blobs')) == 1 then repos = repos + 1 end
end
local uploading = uploading_in(scope)
return {bytes + uploading, count, repos, uploading}
"""

# ARGV: P, then names. For each, the bytes of its blobs no other repository uses: those the
# registry's tally (``*``, complete: the caller counted it first) holds with one repository.
_UNIQUE = """
local refs = live('*') .. 'refs'
local out = {}
for i = 2, #ARGV do
  local sizes = hash(key(ARGV[i], 'blobs'))
  local total = 0
  for digest, size in pairs(sizes) do
    if redis.call('HGET', refs, digest) == '1' then total = total + tonumber(size) end
  end
  out[#out + 1] = int(total)
end
return out
"""

# ARGV: P, scope, 'building' (the tally itself) or 'recounting' (its shadow), now. Starts
# counting the tally unless it is counted or being counted already.
_BEGIN_TALLY = """
local scope, which = ARGV[2], ARGV[3]
if which == 'building' then
  if redis.call('ZSCORE', P .. 'scopes', scope) then return 0 end
  redis.call('ZADD', P .. 'scopes', ARGV[4], scope)
  redis.call('DEL', live(scope) .. 'refs', live(scope) .. 'sizes', live(scope) .. 'bytes')
else
  if not ready(scope) or redis.call('HEXISTS', P .. 'recounting', scope) == 1 then return 0 end
  redis.call('DEL', shadow(scope) .. 'refs', shadow(scope) .. 'sizes', shadow(scope) .. 'bytes')
end
redis.call('HSET', P .. which, scope, '')
return 1
"""

# ARGV: P, scope, 'building' or 'recounting', budget. Counts repositories after the cursor
# until ``budget`` blob entries are counted; returns 1 when the tally is complete (a recount's
# shadow then replaces the tally), 0 if there is more.
_TALLY_STEP = """
local scope, which, budget = ARGV[2], ARGV[3], tonumber(ARGV[4])
local cursor = redis.call('HGET', P .. which, scope)
if not cursor then return 1 end
local base = live(scope)
if which == 'recounting' then base = shadow(scope) end
local low, high = bounds(scope)
if cursor ~= '' then low = '(' .. cursor end
local entries = 0
while true do
  local names = redis.call('ZRANGEBYLEX', P .. 'repos', low, high, 'LIMIT', 0, 20)
  if #names == 0 then
    redis.call('HDEL', P .. which, scope)
    if which == 'recounting' then
      for _, kind in ipairs({'refs', 'sizes', 'bytes'}) do
        redis.call('DEL', live(scope) .. kind)
        if redis.call('EXISTS', shadow(scope) .. kind) == 1 then
          redis.call('RENAME', shadow(scope) .. kind, live(scope) .. kind)
        end
      end
    end
    return 1
  end
  for _, name in ipairs(names) do
    local flat = redis.call('HGETALL', key(name, 'blobs'))
    for i = 1, #flat, 2 do tally_add({base}, flat[i], flat[i + 1]) end
    entries = entries + #flat / 2
    low = '(' .. name
    if entries >= budget then
      redis.call('HSET', P .. which, scope, name)
      return 0
    end
  end
  redis.call('HSET', P .. which, scope, names[#names])
end
"""

# ARGV: P, oldest score kept. Tallies of scopes no reservation named since are dropped (a quota
# removed from the configuration).
_FORGET_SCOPES = """
local old = redis.call('ZRANGEBYSCORE', P .. 'scopes', '-inf', '(' .. ARGV[2])
for _, scope in ipairs(old) do
  for _, base in ipairs({live(scope), shadow(scope)}) do
    redis.call('DEL', base .. 'refs', base .. 'sizes', base .. 'bytes')
  end
  redis.call('HDEL', P .. 'building', scope)
  redis.call('HDEL', P .. 'recounting', scope)
  redis.call('ZREM', P .. 'scopes', scope)
end
return old
"""

# ARGV: P, name, version, mode, manifest count, digest/record/pushed triples, tag count,
# tag/digest/pushed triples, blob/size pairs. mode 'replace': the entry becomes the layout's
# (if no write came after ``version``; returns 0 otherwise), keeping pull times and the older of
# the two push times; 'gone': the repository is no longer in the layout (same condition);
# 'merge': add what the index lacks and leave the repository stale (after lost races).
_REFRESH = """
local name, version, mode = ARGV[2], ARGV[3], ARGV[4]
if mode ~= 'merge' and (redis.call('GET', key(name, 'v')) or '') ~= version then return 0 end
local nman = tonumber(ARGV[5])
local t0 = 6 + 3 * nman
local ntags = tonumber(ARGV[t0])
local b0 = t0 + 1 + 3 * ntags
local bases = tallies(name)
if mode == 'merge' then
  redis.call('ZADD', P .. 'repos', 'NX', 0, name)
  redis.call('SADD', P .. 'stale', name)
  for i = 6, t0 - 1, 3 do
    if redis.call('HSETNX', key(name, 'manifests'), ARGV[i], ARGV[i + 1]) == 1 then
      redis.call('HSET', key(name, 'mpushed'), ARGV[i], ARGV[i + 2])
    end
  end
  for i = t0 + 1, b0 - 1, 3 do
    if redis.call('HSETNX', key(name, 'tagdigest'), ARGV[i], ARGV[i + 1]) == 1 then
      redis.call('ZADD', key(name, 'tags'), 0, ARGV[i])
      redis.call('HSET', key(name, 'tagpushed'), ARGV[i], ARGV[i + 2])
    end
  end
  for i = b0, #ARGV, 2 do put_blob(bases, name, ARGV[i], ARGV[i + 1], true) end
  recount(name)
  listed(name)
  return 1
end
redis.call('SREM', P .. 'stale', name)
if mode == 'gone' then
  drop_blobs(name)
  for _, kind in ipairs({'tags', 'tagdigest', 'tagpushed', 'manifests', 'mpushed', 'pulled',
                         'v', 'sum'}) do
    redis.call('DEL', key(name, kind))
  end
  redis.call('ZREM', P .. 'repos', name)
  unlist(name)
  return 1
end
local oldpushed, oldpulled = hash(key(name, 'mpushed')), hash(key(name, 'pulled'))
local olddigest, oldtagpushed = hash(key(name, 'tagdigest')), hash(key(name, 'tagpushed'))
for _, kind in ipairs({'tags', 'tagdigest', 'tagpushed', 'manifests', 'mpushed', 'pulled'}) do
  redis.call('DEL', key(name, kind))
end
redis.call('ZADD', P .. 'repos', 0, name)
for i = 6, t0 - 1, 3 do
  local digest, pushed = ARGV[i], ARGV[i + 2]
  local old = oldpushed[digest]
  if old and tonumber(old) < tonumber(pushed) then pushed = old end
  redis.call('HSET', key(name, 'manifests'), digest, ARGV[i + 1])
  redis.call('HSET', key(name, 'mpushed'), digest, pushed)
  if oldpulled[digest] then redis.call('HSET', key(name, 'pulled'), digest, oldpulled[digest]) end
end
for i = t0 + 1, b0 - 1, 3 do
  local tag, digest, pushed = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if olddigest[tag] == digest then pushed = oldtagpushed[tag] or pushed end
  redis.call('ZADD', key(name, 'tags'), 0, tag)
  redis.call('HSET', key(name, 'tagdigest'), tag, digest)
  redis.call('HSET', key(name, 'tagpushed'), tag, pushed)
end
-- the blobs: only what differs touches the tallies
local blobs = {}
for i = b0, #ARGV, 2 do blobs[ARGV[i]] = ARGV[i + 1] end
for digest, _ in pairs(hash(key(name, 'blobs'))) do
  if blobs[digest] == nil then
    redis.call('HDEL', key(name, 'blobs'), digest)
    tally_remove(bases, digest)
  end
end
for digest, size in pairs(blobs) do put_blob(bases, name, digest, size, false) end
recount(name)
listed(name)
return 1
"""

# ARGV: P, token, milliseconds. Keep the verification lease if it is still ours.
_RENEW = """
if redis.call('GET', P .. 'verifying') == ARGV[2] then
  return redis.call('PEXPIRE', P .. 'verifying', ARGV[3])
end
return 0
"""

# ARGV: P, token, milliseconds, time. A verification done: the next is due in ``milliseconds``.
_VERIFIED = """
redis.call('SET', P .. 'verified', ARGV[4], 'PX', ARGV[3])
if redis.call('GET', P .. 'verifying') == ARGV[2] then redis.call('DEL', P .. 'verifying') end
"""

_SCRIPTS = {
    "push": _PUSH,
    "link": _LINK,
    "untag": _UNTAG,
    "drop_manifest": _DROP_MANIFEST,
    "drop_repository": _DROP_REPOSITORY,
    "pulls": _PULLS,
    "set_pulled": _SET_PULLED,
    "stale": _STALE,
    "reserve": _RESERVE,
    "release": _RELEASE,
    "tags": _TAGS,
    "repositories": _REPOSITORIES,
    "sorted": _SORTED,
    "rank": _RANK,
    "repository": _REPOSITORY,
    "summaries": _SUMMARIES,
    "usage": _USAGE,
    "unique": _UNIQUE,
    "begin_tally": _BEGIN_TALLY,
    "tally_step": _TALLY_STEP,
    "forget_scopes": _FORGET_SCOPES,
    "refresh": _REFRESH,
    "renew": _RENEW,
    "verified": _VERIFIED,
}


def _check_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop. redis-py (8.1 on Python 3.11 here)
    sometimes swallows a cancellation that arrives during a command: the command returns
    normally and the request to stop is lost, so a loop that would go on checks first (else
    shutdown waits on it forever)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _time(value: float) -> str:
    # repr round-trips a float exactly; Lua compares the strings with tonumber
    return repr(float(value))


def _record_json(record: ManifestRecord) -> str:
    return json.dumps(
        [
            record.media_type,
            record.size,
            str(record.subject) if record.subject else None,
            record.artifact_type,
            " ".join(str(d) for d in record.children),
        ]
    )


def _record(digest: str, body: bytes | str, pushed: bytes | str, pulled: Any) -> ManifestRecord:
    media_type, size, subject, artifact_type, children = json.loads(body)
    return ManifestRecord(
        digest=Digest.parse(digest),
        media_type=media_type,
        size=size,
        pushed=float(pushed),
        pulled=float(pulled) if pulled is not None else None,
        subject=Digest.parse(subject) if subject else None,
        artifact_type=artifact_type,
        children=tuple(Digest.parse(d) for d in children.split()) if children else (),
    )


def _summary(row: list[Any]) -> RepositorySummary:
    name, tags, pushed, manifests, pulled, size = row
    return RepositorySummary(
        _text(name),
        int(tags),
        int(manifests),
        int(size),
        float(pushed) if pushed is not None else None,
        float(pulled) if pulled is not None else None,
    )


def _flag(value: bool) -> str:
    return "1" if value else ""


def _position(key: RepositoryKey | None) -> list[str]:
    """``key`` as the ``sorted`` script's arguments: whether there is one, its score as Redis
    parses it exactly (a float's repr; '-inf' for a repository without tags), its name."""
    if key is None:
        return ["", "", ""]
    if key.value is None:
        return ["1", "-inf", key.name]
    value = key.value
    return ["1", _time(value) if isinstance(value, float) else str(value), key.name]


def _pairs(flat: dict[bytes, bytes]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in flat.items()}


class RedisIndex:
    """The metadata index of one store in Redis. ``connect`` makes a ``redis.asyncio`` client
    (called again in a forked worker and on another event loop: connections cross neither).
    ``namespace`` names the index; by default the store's id (``storage``'s
    ``/dockyard/index-id``, created on first use)."""

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        storage: Store | None = None,
        namespace: str | None = None,
        pull_flush: float = 5.0,
    ) -> None:
        if storage is None and namespace is None:
            raise ValueError("RedisIndex needs the store (for its id) or a namespace")
        self.connect = connect
        self.storage = storage
        self.namespace = namespace
        self.pull_flush = pull_flush
        #: (repository, digest) -> latest pull time not yet written
        self._pulls: dict[tuple[str, str], float] = {}
        self._owner: tuple[int, asyncio.AbstractEventLoop] | None = None
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._prefix_text = ""

    # -- plumbing -------------------------------------------------------------------------

    def _client(self) -> Any:
        owner = (os.getpid(), asyncio.get_running_loop())
        if self._owner != owner or self._redis is None:
            self._owner = owner
            self._redis = self.connect()
            self._scripts = {
                name: self._redis.register_script(_LIB + source)
                for name, source in _SCRIPTS.items()
            }
        return self._redis

    async def prefix(self) -> str:
        """``dockyard:index:{<namespace>}:``, the start of every key of this index."""
        if not self._prefix_text:
            namespace = self.namespace
            if namespace is None:
                assert self.storage is not None
                namespace = await read_token(self.storage, layout.index_id())
            self._prefix_text = f"dockyard:index:{{{namespace}}}:"
        return self._prefix_text

    async def _key(self, name: str, kind: str) -> str:
        return f"{await self.prefix()}r:{name}:{kind}"

    async def _call(self, script: str, *args: Any) -> Any:
        prefix = await self.prefix()
        self._client()
        return await self._scripts[script](keys=[prefix + "repos"], args=[prefix, *args])

    async def _safely(self, name: str, script: str, *args: Any) -> None:
        """A write on a client's path: a failure marks the repository stale for the next
        verification instead of failing the request (the layout has the truth already)."""
        try:
            await self._call(script, *args)
        except Exception as exc:  # Redis, or the store while reading its id: never the request's
            log.error(
                "index write for %s failed (refreshed at the next verification): %s", name, exc
            )
            with contextlib.suppress(Exception):
                await self._call("stale", name)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush_pulls()
        client, owner = self._redis, self._owner
        self._redis, self._owner, self._scripts = None, None, {}
        if client is not None and owner == (os.getpid(), asyncio.get_running_loop()):
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- what the registry's writes tell it -----------------------------------------------

    async def manifest_pushed(
        self, name: str, record: ManifestRecord, tags: Iterable[str], blobs: dict[Digest, int]
    ) -> None:
        """A manifest stored in ``name`` and ``tags`` pointed at it, all at ``record.pushed``;
        ``blobs`` (digest -> size) are the blobs it makes the repository use."""
        tags = list(tags)
        args: list[Any] = [
            name,
            str(record.digest),
            _record_json(record),
            _time(record.pushed),
            _time(record.pulled) if record.pulled is not None else "",
            len(tags),
            *tags,
        ]
        for digest, size in blobs.items():
            args += [str(digest), size]
        await self._safely(name, "push", *args)

    async def blob_linked(self, name: str, digest: Digest, size: int) -> None:
        await self._safely(name, "link", name, str(digest), size)

    async def tag_deleted(self, name: str, tag: str) -> None:
        await self._safely(name, "untag", name, tag)

    async def manifest_deleted(self, name: str, digest: Digest) -> None:
        """The manifest and the tags that pointed at it are gone; the blobs it used stay
        counted until the collector's refresh (their links stay until then)."""
        await self._safely(name, "drop_manifest", name, str(digest))

    async def repository_deleted(self, name: str) -> None:
        await self._call("drop_repository", name, "always", "", "1")

    def note_pull(self, name: str, digest: Digest | str, when: float | None = None) -> None:
        """A pull of a manifest: kept in memory until the next flush (no write on the pull
        path)."""
        self._pulls[(name, str(digest))] = time.time() if when is None else when

    async def flush_pulls(self) -> None:
        if not self._pulls:
            return
        pulls, self._pulls = self._pulls, {}
        args: list[Any] = []
        for (name, digest), when in pulls.items():
            args += [name, digest, _time(when)]
        try:
            await self._call("pulls", *args)
        except Exception as exc:  # as a failed write: never the pull's concern
            log.warning("writing %d pull times failed (they are lost): %s", len(pulls), exc)

    async def set_pulled(self, name: str, digest: Digest, when: float) -> None:
        """Set a manifest's last pull time (tests and imports; pulls go through
        :meth:`note_pull`)."""
        await self._call("set_pulled", name, str(digest), _time(when))

    async def run_pull_flusher(self) -> None:
        """Write the pulls noted in this process every ``pull_flush`` seconds, until
        cancelled (and once more then)."""
        try:
            while True:
                await asyncio.sleep(self.pull_flush)
                await self.flush_pulls()
                _check_cancelled()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush_pulls())

    # -- reads ----------------------------------------------------------------------------

    async def tags(
        self, name: str, after: str | None = None, limit: int = 100, contains: str = ""
    ) -> list[TagRecord]:
        """Up to ``limit`` tags of ``name`` after ``after``, sorted: ``ZRANGEBYLEX`` with
        ``LIMIT`` and the page's fields, however many tags there are. With ``contains``, read
        in batches from there, keeping the tags that hold it."""
        if not contains:
            return self._tag_records(await self._call("tags", name, after or "", limit))
        found: list[TagRecord] = []
        batch = max(limit, 500)
        while len(found) < limit:
            rows = await self._call("tags", name, after or "", batch)
            found += [r for r in self._tag_records(rows) if contains in r.tag]
            if len(rows) < batch:
                break
            after = _text(rows[-1][0])
        return found[:limit]

    @staticmethod
    def _tag_records(rows: list[Any]) -> list[TagRecord]:
        return [
            TagRecord(
                _text(tag),
                Digest.parse(_text(digest)),
                float(pushed),
                float(pulled) if pulled is not None else None,
            )
            for tag, digest, pushed, pulled in rows
        ]

    async def snapshot(self, name: str) -> RepositorySnapshot:
        client = self._client()
        keys = [
            await self._key(name, kind)
            for kind in ("manifests", "mpushed", "pulled", "tagdigest", "tagpushed")
        ]
        # MULTI: one consistent view of the repository
        async with client.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.hgetall(key)
            manifests, pushed, pulled, digests, tag_pushed = map(_pairs, await pipe.execute())
        snap = RepositorySnapshot(name)
        for digest, body in manifests.items():
            record = _record(digest, body, pushed.get(digest, "0"), pulled.get(digest))
            snap.manifests[record.digest] = record
        for tag in sorted(digests, key=lambda t: t.encode()):
            digest = Digest.parse(digests[tag])
            m = snap.manifests.get(digest)
            snap.tags.append(
                TagRecord(tag, digest, float(tag_pushed.get(tag, "0")), m.pulled if m else None)
            )
        return snap

    async def repositories(
        self,
        after: str | None = None,
        limit: int | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> list[RepositorySummary]:
        """Repositories with at least one manifest, sorted by name, after ``after``. With
        ``keep``, only the names it accepts, ``limit`` of them: the names are read in batches
        (``ZRANGEBYLEX ... LIMIT``) and only those kept are summarised, so a page costs the
        names skipped plus the page."""
        if keep is None:
            rows = await self._call("repositories", after or "", -1 if limit is None else limit)
            return [_summary(row) for row in rows]
        listed = await self.prefix() + "listed"
        batch = 100 if limit is None else max(2 * limit, 100)
        names: list[str] = []
        low = f"({after}" if after else "-"
        while limit is None or len(names) < limit:
            found = [_text(n) for n in await self._client().zrangebylex(listed, low, "+", 0, batch)]
            names += [n for n in found if keep(n)]
            if len(found) < batch:
                break
            low = f"({found[-1]}"
        names = names if limit is None else names[:limit]
        if not names:
            return []
        # a repository deleted since it was listed is left out
        return [_summary(row) for row in await self._call("summaries", *names)]

    async def repositories_sorted(
        self,
        sort: str = "name",
        descending: bool = False,
        after: RepositoryKey | tuple[Any, str] | None = None,
        limit: int = 100,
        keep: Callable[[str], bool] | None = None,
        contains: str = "",
    ) -> list[RepositorySummary]:
        """See :meth:`~dockyard.registry.index.Index.repositories_sorted`; the same order as
        SQLite's. Sorted sets, not a sort: by name ``listed`` (ZRANGEBYLEX), by the others
        ``bytags``/``bysize``/``bypushed``, kept by every write, whose scores are the
        repositories' aggregates and whose ties Redis orders by name. A page is a seek (the
        key's rank: O(log^2 N)) and the page's ranks, in one script; with ``keep``, names and
        scores are read in batches from there (the names refused read past, never summarised)
        and the page's summaries read after (a repository deleted meanwhile is left out)."""
        key = checked_key(sort, after)
        if limit <= 0:
            return []
        if contains:  # a filter on names, read past in the batches as ``keep``'s refusals are
            accept = keep
            keep = lambda name: contains in name and (accept is None or accept(name))  # noqa: E731
        await self._ranked()
        position = _position(key)
        if keep is None:
            rows = await self._call("sorted", sort, _flag(descending), *position, limit, "1")
            return [_summary(row) for row in rows]
        batch = max(2 * limit, 100)
        names: list[str] = []
        while len(names) < limit:
            flat = await self._call("sorted", sort, _flag(descending), *position, batch, "")
            found = [(_text(flat[i]), _text(flat[i + 1])) for i in range(0, len(flat), 2)]
            names += [name for name, _ in found if keep(name)]
            if len(found) < batch:
                break
            name, score = found[-1]
            position = ["1", score, name]
            _check_cancelled()
        names = names[:limit]
        if not names:
            return []
        return [_summary(row) for row in await self._call("summaries", *names)]

    async def _ranked(self) -> None:
        """Make sure the sorted sets by column hold every listed repository: once for an index
        written before they existed (or that Redis lost), in steps of :data:`RANK_BUDGET`
        repositories (every write keeps them after that); a GET otherwise."""
        if _text(await self._client().get(await self.prefix() + "ranked") or b"") == RANKED:
            return
        after = ""
        while True:
            after = _text(await self._call("rank", after, RANK_BUDGET, RANKED))
            if not after:
                return
            _check_cancelled()

    async def manifests(self, name: str, digests: Iterable[Digest]) -> dict[Digest, ManifestRecord]:
        """The records of those of ``digests`` that ``name`` holds (a page's worth: HMGETs of
        just those)."""
        wanted = sorted({str(d) for d in digests})
        if not wanted:
            return {}
        keys = [await self._key(name, kind) for kind in ("manifests", "mpushed", "pulled")]
        async with self._client().pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.hmget(key, wanted)
            bodies, pushed, pulled = await pipe.execute()
        found: dict[Digest, ManifestRecord] = {}
        for digest, body, push, pull in zip(wanted, bodies, pushed, pulled, strict=True):
            if body is not None:
                record = _record(digest, body, push or "0", _text(pull) if pull else None)
                found[record.digest] = record
        return found

    async def repository(self, name: str) -> RepositorySummary | None:
        row = await self._call("repository", name)
        return _summary(row) if row else None

    async def usage(self, scope: str) -> Usage:
        """Space used within ``scope`` (see :func:`~dockyard.registry.index.scope_condition`),
        each blob once, with the uploads in progress."""
        size, blobs, repositories, uploading = await self._call("usage", scope)
        return Usage(scope, int(size), int(blobs), int(repositories), int(uploading))

    # -- quotas: reservations for uploads -------------------------------------------------

    async def reserve(
        self,
        name: str,
        upload: str,
        total: int,
        limits: list[tuple[str, int]],
        digest: Digest | None = None,
    ) -> QuotaExceeded | None:
        """Count ``total`` bytes for the upload ``upload`` of ``name`` (replacing what it
        counted before) unless that takes a scope of ``limits`` over its limit; then nothing
        changes and the scope is returned. ``digest``: the blob the bytes are, when known.

        One script: the check and the update run while no other client's command does, so
        reservations and pushes of every instance are serialized and none overshoots."""
        args: list[Any] = [
            name,
            upload,
            total,
            str(digest) if digest is not None else "",
            _time(time.time()),
        ]
        for scope, limit in limits:
            args += [scope, limit]
        for _ in range(5):
            _check_cancelled()
            refused = await self._call("reserve", *args)
            if refused is None:
                return None
            if len(refused) == 2:  # scopes without their tally yet: count them, then again
                for scope, _ in limits:
                    await self._count_tally(scope, "building")
                continue
            scope, limit, used, wanted = refused
            return QuotaExceeded(_text(scope), int(limit), int(used), int(wanted))
        raise RuntimeError(f"the usage of {[s for s, _ in limits]} could not be counted")

    async def unique_bytes(self, names: Iterable[str]) -> dict[str, int]:
        """See :meth:`~dockyard.registry.index.Index.unique_bytes`: one script over the
        page's repositories, after the ``*`` tally is counted (step by step, once)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        await self.tally(["*"])
        sums = await self._call("unique", *wanted)
        return {name: int(total) for name, total in zip(wanted, sums, strict=True)}

    async def tally(self, scopes: Iterable[str]) -> None:
        """Keep ``scopes`` tallied from now on (counted now, step by step, if they are not), so
        their usage is read, not counted in a script that would hold Redis."""
        for scope in scopes:
            await self._count_tally(scope, "building")

    async def _count_tally(self, scope: str, which: str) -> None:
        """Count the tally of ``scope`` (``building``) or its shadow (``recounting``), step
        by step (or finish the counting another client began and left)."""
        await self._call("begin_tally", scope, which, _time(time.time()))
        while not await self._call("tally_step", scope, which, TALLY_BUDGET):
            _check_cancelled()

    async def release(self, name: str, upload: str, total: int | None = None) -> None:
        """The upload counts ``total`` bytes from now on, or nothing (``None``)."""
        await self._safely(name, "release", name, upload, "" if total is None else total)

    async def contents(self) -> dict[str, Any]:
        """Everything but pull times, canonically ordered (as ``MetadataIndex.contents``)."""
        tags: list[tuple[Any, ...]] = []
        manifests: list[tuple[Any, ...]] = []
        blobs: list[tuple[Any, ...]] = []
        for name in sorted(await self.indexed_repositories(), key=str.encode):
            snap = await self.snapshot(name)
            tags += [(name, t.tag, str(t.digest), t.pushed) for t in snap.tags]
            for digest in sorted(snap.manifests, key=str):
                m = snap.manifests[digest]
                manifests.append(
                    (
                        name,
                        str(digest),
                        m.media_type,
                        m.size,
                        str(m.subject) if m.subject else None,
                        m.artifact_type,
                        " ".join(str(d) for d in m.children),
                    )
                )
            sizes = _pairs(await self._client().hgetall(await self._key(name, "blobs")))
            blobs += [(name, d, int(sizes[d])) for d in sorted(sizes)]
        return {"tags": tags, "manifests": manifests, "blobs": blobs}

    # -- rebuilding from the layout -------------------------------------------------------

    async def _version(self, name: str) -> str:
        value = await self._client().get(await self._key(name, "v"))
        return _text(value) if value is not None else ""

    async def refresh(self, storage: Store, name: str) -> bool:
        """Make the index's entry for ``name`` what the layout holds now; pull times and the
        push times of manifests still there are kept. Returns whether the repository exists.
        A write to the repository while the layout is read makes it read again (see the module
        docstring), so no push is lost."""
        for attempt in range(REFRESH_TRIES + 1):
            version = await self._version(name)
            found = await _read_layout(storage, name)
            merge = attempt == REFRESH_TRIES
            mode = "merge" if merge else "replace" if found is not None else "gone"
            args: list[Any] = [name, version, mode]
            manifests = found.manifests.values() if found is not None else ()
            args.append(len(manifests))
            for record in manifests:
                args += [str(record.digest), _record_json(record), _time(record.pushed)]
            tags = found.tags if found is not None else []
            args.append(len(tags))
            for tag in tags:
                args += [tag.tag, str(tag.digest), _time(tag.pushed)]
            for digest, size in (found.blobs if found is not None else {}).items():
                args += [str(digest), size]
            if await self._call("refresh", *args):
                if merge:
                    log.warning("index refresh of %s kept racing with writes: merged", name)
                return found is not None
        raise AssertionError("unreachable: the last attempt merges unconditionally")

    async def indexed_repositories(self) -> set[str]:
        names = await self._client().zrange(await self.prefix() + "repos", 0, -1)
        return {_text(n) for n in names}

    async def _versions(self) -> dict[str, str]:
        """Every indexed repository with its version, in one round trip."""
        names = sorted(await self.indexed_repositories())
        async with self._client().pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(await self._key(name, "v"))
            versions = await pipe.execute()
        return {n: _text(v) if v is not None else "" for n, v in zip(names, versions, strict=True)}

    async def _forget_gone(self, indexed: dict[str, str], names: list[str]) -> list[str]:
        """Drop the repositories indexed (at ``indexed``'s versions) that the layout listing
        ``names`` (taken after) lacks, unless a write reached them since."""
        gone = []
        for name in sorted(set(indexed) - set(names)):
            if await self._call("drop_repository", name, "if", indexed[name], "0"):
                gone.append(name)
        return gone

    async def reindex(self, storage: Store) -> list[str]:
        """Rebuild every repository's entry from the layout; returns the repositories indexed."""
        indexed = await self._versions()
        names = await inventory.repository_names(storage)
        for name in names:
            await self.refresh(storage, name)
        await self._forget_gone(indexed, names)
        return names

    async def verify(self, storage: Store) -> list[str]:
        """Refresh every repository whose tags, revisions or layer links in the layout differ
        from the index (or that a failed write marked stale); returns their names."""
        indexed = await self._versions()
        names = await inventory.repository_names(storage)
        changed = []
        for name in names:
            if not await self._matches_layout(storage, name):
                await self.refresh(storage, name)
                changed.append(name)
        changed += await self._forget_gone(indexed, names)
        await self._forget_finished_uploads(storage)
        await self._recount()
        await self._ranked()
        if changed:
            log.info("index verification refreshed %d repositories: %s", len(changed), changed[:10])
        return changed

    async def _matches_layout(self, storage: Store, name: str) -> bool:
        repo = await _glance(storage, name)
        prefix = await self.prefix()
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.zscore(prefix + "repos", name)
            pipe.sismember(prefix + "stale", name)
            pipe.hgetall(await self._key(name, "tagdigest"))
            pipe.hkeys(await self._key(name, "manifests"))
            pipe.hkeys(await self._key(name, "blobs"))
            indexed, stale, tags, manifests, blobs = await pipe.execute()
        if indexed is None or stale:
            return False
        return same_as_layout(
            repo, _pairs(tags), {_text(d) for d in manifests}, {_text(d) for d in blobs}
        )

    async def _recount(self) -> None:
        """Recount every scope's tally from the repositories' blobs, in steps, into a shadow
        that replaces it when complete (see the scripts); drop the tallies of scopes no
        reservation named for :data:`SCOPE_IDLE` (their quota is gone)."""
        await self._call("forget_scopes", _time(time.time() - SCOPE_IDLE))
        scopes = await self._client().zrange(await self.prefix() + "scopes", 0, -1)
        for scope in sorted(_text(s) for s in scopes):
            await self._count_tally(scope, "recounting")

    async def _forget_finished_uploads(self, storage: Store) -> None:
        """Reservations whose upload session is gone count no more: a session found gone at
        two verifications in a row (one finding could be a commit between the removal of its
        directory and its blob's link); a transient reservation left for longer than
        :data:`TRANSIENT_MAX_AGE` (its server died during the request)."""
        client = self._client()
        prefix = await self.prefix()
        repos = sorted(_text(n) for n in await client.zrange(prefix + "uploading", 0, -1))
        seen = _pairs(await client.hgetall(prefix + "orphans"))
        now = time.time()
        orphans: dict[str, str] = {}
        for name in repos:
            for upload in sorted(
                _text(u) for u in await client.hkeys(await self._key(name, "uploads"))
            ):
                key = f"{name}\n{upload}"
                if upload.startswith(TRANSIENT):
                    first = float(seen.get(key, now))
                    if now - first >= TRANSIENT_MAX_AGE:
                        await self.release(name, upload)
                    else:
                        orphans[key] = _time(first)
                    continue
                try:
                    await storage.stat(layout.upload_started_at(name, upload))
                except PathNotFound:
                    if key in seen:
                        await self.release(name, upload)
                    else:
                        orphans[key] = _time(now)
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(prefix + "orphans")
            if orphans:
                pipe.hset(prefix + "orphans", mapping=orphans)
            await pipe.execute()

    async def _take_verification(self) -> str | None:
        """The verification lease if a verification is due (the ``verified`` key of the last
        one has expired) and no other instance is running one; its token, or None."""
        client = self._client()
        prefix = await self.prefix()
        if await client.exists(prefix + "verified"):
            return None
        token = secrets.token_hex(16)
        if await client.set(prefix + "verifying", token, nx=True, px=LEASE_MS):
            return token
        return None

    async def _keep_lease(self, token: str) -> None:
        while True:
            await asyncio.sleep(LEASE_MS / 3000)
            with contextlib.suppress(RedisError, OSError):
                await self._call("renew", token, LEASE_MS)
            _check_cancelled()

    async def verify_if_due(self, storage: Store, interval: float) -> list[str] | None:
        """Verify unless another instance did within ``interval`` or is verifying now;
        returns what :meth:`verify` returned, or None if it was not this one's turn."""
        token = await self._take_verification()
        _check_cancelled()
        if token is None:
            return None
        keeping = asyncio.create_task(self._keep_lease(token))
        try:
            changed = await self.verify(storage)
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
        await self._call("verified", token, max(1, int(interval * 1000)), _time(time.time()))
        return changed

    async def run_verifier(self, storage: Store, interval: float, first_delay: float) -> None:
        """Verify against the layout once per ``interval`` for the whole deployment, until
        cancelled: every :data:`VERIFY_TICK` seconds (or ``interval``, if shorter) after
        ``first_delay``, each instance looks whether a verification is due and takes it if no
        other has. An index Redis lost is so rebuilt within a tick."""
        await asyncio.sleep(first_delay)
        while True:
            try:
                await self.verify_if_due(storage, interval)
            except Exception:  # a bug or a storage failure must not end verification for good
                log.exception("index verification failed (will retry)")
            _check_cancelled()
            await asyncio.sleep(min(interval, VERIFY_TICK))
