"""The client against a real three-node cluster whose addresses are in AGENTSTORE_NODES
(crates/agentstore/tests/python_client.rs starts one and runs these)."""

import os
import time
import unittest
import uuid

import agentstore

NODES = [n for n in os.environ.get("AGENTSTORE_NODES", "").split(",") if n]


def unique(collection: str) -> str:
    return f"{collection}:{uuid.uuid4().hex}"


@unittest.skipUnless(NODES, "AGENTSTORE_NODES names no cluster")
class AgainstACluster(unittest.TestCase):
    def setUp(self) -> None:
        self.a = agentstore.Client(NODES[0])
        self.c = agentstore.Client(NODES[2])

    def tearDown(self) -> None:
        self.a.close()
        self.c.close()

    def test_values_written_on_one_node_read_on_another(self) -> None:
        key = unique("notes")
        version = self.a.put(key, {"step": 1, "tags": ["x"]})
        self.assertTrue(version)
        # N=3 W=2 R=2: a read that starts after the write was acknowledged sees it.
        self.assertEqual(self.c.get(key), {"step": 1, "tags": ["x"]})
        versioned = self.c.get_versioned(key)
        assert versioned is not None
        self.assertEqual(versioned.version, version)
        self.a.delete(key)
        self.assertIsNone(self.c.get(key))
        self.assertIsNone(self.c.get(unique("notes")))

    def test_counters_and_sets(self) -> None:
        hits = unique("hits")
        self.assertEqual(self.a.counter_add(hits, 5), 5)
        self.assertEqual(self.c.counter_add(hits, -2), 3)
        self.assertEqual(self.a.counter(hits), 3)
        tags = unique("tags")
        self.a.set_add(tags, "red")
        self.a.set_add(tags, {"blue": True})
        self.a.set_remove(tags, "red")
        self.assertEqual(self.c.set_members(tags), [{"blue": True}])

    def test_errors_are_typed(self) -> None:
        with self.assertRaises(agentstore.WrongOperation) as caught:
            self.a.counter_add(unique("notes"), 1)
        self.assertEqual(caught.exception.code, "wrong_operation")
        self.assertEqual(caught.exception.status, 409)
        # A level the collection cannot deliver is refused, not weakened.
        with self.assertRaises(agentstore.ConsistencyUnavailable):
            self.a.put(unique("notes"), 1, consistency="strong")
        with self.assertRaises(agentstore.InvalidRequest):
            self.a.get(":starts-with-a-colon")
        # Compare-and-set: on a strong collection the second fails typed.
        key = unique("ledger")
        self.a.put(key, 1, if_version="absent")
        with self.assertRaises(agentstore.VersionMismatch):
            self.a.put(key, 2, if_version="absent")
        self.assertEqual(self.c.get(key), 1)
        # Leaderless collections cannot compare-and-set: refused, typed.
        with self.assertRaises(agentstore.Unsupported):
            self.a.put(unique("notes"), 1, if_version="absent")

    def test_a_session_follows_its_client_between_nodes(self) -> None:
        key = unique("chat")
        session = self.a.session()
        session.put(key, "hi")
        self.assertIn("node-a=", session.token)
        # The token carried to another node: that node serves the session's own write.
        elsewhere = self.c.session(session.token)
        self.assertEqual(elsewhere.get(key), "hi")
        self.assertGreaterEqual(len(elsewhere.token), len(session.token))
        with self.assertRaises(agentstore.InvalidRequest) as caught:
            self.c.session("not a token").get(key)
        self.assertEqual(caught.exception.code, "invalid_session")

    def test_scans_page_in_key_order(self) -> None:
        prefix = unique("page")
        keys = [f"{prefix}-{i:02}" for i in range(25)]
        for i, key in enumerate(keys):
            self.a.put(key, i)
        page = self.c.scan(prefix, limit=10)
        self.assertEqual([e.key for e in page.entries], keys[:10])
        self.assertEqual(page.next, keys[9])
        self.assertEqual([e.key for e in self.c.scan_all(prefix, page_size=7)], keys)
        self.assertEqual([e.value for e in self.c.scan_all(prefix)], list(range(25)))

    def test_an_unreachable_node_is_skipped(self) -> None:
        with agentstore.Client(["127.0.0.1:1"] + NODES, timeout=5) as client:
            key = unique("notes")
            client.put(key, "through the next node")
            self.assertEqual(client.get(key), "through the next node")
        with agentstore.Client("127.0.0.1:1", timeout=2) as nowhere:
            with self.assertRaises(agentstore.Unavailable):
                nowhere.get(unique("notes"))

    def test_status_names_the_members_and_guarantees(self) -> None:
        status = self.a.status()
        self.assertEqual(status["node"], "node-a")
        self.assertEqual(len(status["members"]), 3)


    def test_a_watch_sees_writes_made_on_another_node_and_resumes_where_it_stopped(self) -> None:
        collection = f"jobs{uuid.uuid4().hex[:8]}"
        start = self.c.changes(collection).position
        for i in range(3):
            self.a.put(f"{collection}:{i}", i)
        seen: list[agentstore.Change] = []
        watch = self.c.watch(collection, after=start)
        while len(seen) < 3:
            seen.append(next(watch))
        self.assertEqual(sorted(c.key for c in seen), [f"{collection}:{i}" for i in range(3)])
        self.assertTrue(all(not c.deleted for c in seen))
        # Resumed after the second: the third only, then a delete made since.
        self.a.delete(f"{collection}:0")
        rest: list[agentstore.Change] = []
        watch = self.c.watch(collection, after=seen[1].position)
        while len(rest) < 2:
            rest.append(next(watch))
        self.assertEqual(rest[0], seen[2])
        self.assertTrue(rest[1].deleted and rest[1].value is None)
        # Another node's position is refused, not misread.
        with self.assertRaises(agentstore.PositionUnavailable):
            self.a.changes(collection, after=seen[2].position)

    def test_a_value_with_a_ttl_expires_on_every_node(self) -> None:
        key = unique("beats")
        self.a.put(key, "alive", ttl=3.0)
        self.assertEqual(self.c.get(key), "alive")
        time.sleep(3.1)
        self.assertIsNone(self.c.get(key))
        self.assertIsNone(self.a.get(key))

    def test_two_editors_edit_one_document_against_the_same_revision(self) -> None:
        key = unique("docs")
        self.assertEqual(self.a.document(key), agentstore.Document(0, ""))
        first = None
        for _ in range(100):  # the Raft group may still be electing its leader
            try:
                first = self.a.edit(key, 0, ["hello world"])
                break
            except agentstore.Unavailable:
                time.sleep(0.1)
        assert first is not None
        self.assertEqual(first.revision, 1)
        # Both read revision 1; the second edit is transformed past the first.
        self.a.edit(key, 1, [-1, "H", 10])
        second = self.c.edit(key, 1, [11, "!"])
        self.assertEqual(second.revision, 3)
        self.assertEqual(second.applied, [11, "!"])
        self.assertEqual(self.c.document(key), agentstore.Document(3, "Hello world!"))
        # A reader that held revision 1 catches up by the edits since.
        caught = self.c.edits_since(key, 1)
        self.assertEqual(caught.revision, 3)
        self.assertEqual(caught.edits, [["H", -1, 10], [11, "!"]])
        with self.assertRaises(agentstore.StaleRevision):
            self.a.edit(key, 7, [12])
        with self.assertRaises(agentstore.InvalidRequest):
            self.a.edit(key, 3, [2])


if __name__ == "__main__":
    unittest.main()
