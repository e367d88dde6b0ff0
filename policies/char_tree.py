"""CharTree: sglang-router's approximate radix tree of prompt CHARACTERS tagged with backends.

A reproduction of sglang-router's ``tree.rs`` for the ``sglang_cache_aware`` baseline: edges
hold strings, each node records which backends ("tenants") inserted text through it and when
they last did; ``prefix_match`` returns the deepest match over all tenants and the FIRST
tenant recorded on the deepest node reached (sglang takes whatever its concurrent map yields
first); ``evict_to`` removes each over-budget tenant's least recently used leaves until its
character count fits. No tokenizer, no chat template: characters only. Must not import
anything outside the standard library and ``policies``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from policies.types import BackendId

__all__ = ["CharTree"]


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first character -> child
        self.tenants: dict[BackendId, float] = {}  # tenant -> last access (s)


def _shared_prefix(edge: str, text: str, start: int) -> int:
    """Length of the common prefix of ``edge`` and ``text[start:]`` (C-speed comparisons)."""
    n = min(len(edge), len(text) - start)
    if text.startswith(edge[:n], start):
        return n
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class CharTree:
    def __init__(self) -> None:
        self._root = _Node("", None)
        self._chars: dict[BackendId, int] = {}

    def tenant_chars(self, tenant: BackendId) -> int:
        return self._chars.get(tenant, 0)

    def insert(self, text: str, tenant: BackendId, now_s: float) -> None:
        node = self._root
        node.tenants[tenant] = now_s
        self._chars.setdefault(tenant, 0)
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                leaf.tenants[tenant] = now_s
                node.children[text[i]] = leaf
                self._chars[tenant] += len(leaf.text)
                return
            shared = _shared_prefix(child.text, text, i)
            if shared < len(child.text):
                # Split the edge; both halves keep every tenant, so no counts change.
                head = _Node(child.text[:shared], node)
                head.tenants = dict(child.tenants)
                child.text = child.text[shared:]
                child.parent = head
                head.children[child.text[0]] = child
                node.children[text[i]] = head
                child = head
            if tenant not in child.tenants:
                self._chars[tenant] += len(child.text)
            child.tenants[tenant] = now_s
            node = child
            i += shared

    def prefix_match(self, text: str) -> tuple[int, BackendId | None]:
        """(characters matched by any tenant, first tenant of the deepest node reached)."""
        node = self._root
        deepest: _Node | None = None
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            shared = _shared_prefix(child.text, text, i)
            i += shared
            deepest = child
            if shared < len(child.text):
                break
            node = child
        if deepest is None or not deepest.tenants:
            return 0, None
        return i, next(iter(deepest.tenants))

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def evict_to(self, max_chars: int) -> None:
        """Trim every tenant above ``max_chars`` by removing its least recently used leaves."""
        for tenant in [t for t, n in self._chars.items() if n > max_chars]:
            leaves = [
                (node.tenants[tenant], id(node), node)
                for node in self._nodes()
                if tenant in node.tenants
                and not any(tenant in c.tenants for c in node.children.values())
            ]
            heapq.heapify(leaves)
            while self._chars[tenant] > max_chars and leaves:
                _, _, node = heapq.heappop(leaves)
                self._drop(node, tenant)
                parent = node.parent
                if (parent is not None and parent is not self._root and tenant in parent.tenants
                        and not any(tenant in c.tenants for c in parent.children.values())):
                    heapq.heappush(leaves, (parent.tenants[tenant], id(parent), parent))

    def remove_tenant(self, tenant: BackendId) -> None:
        for node in list(self._nodes()):
            if tenant in node.tenants:
                self._drop(node, tenant)
        self._root.tenants.pop(tenant, None)
        self._chars.pop(tenant, None)

    def _drop(self, node: _Node, tenant: BackendId) -> None:
        del node.tenants[tenant]
        self._chars[tenant] -= len(node.text)
        if not node.tenants and node.parent is not None:
            # A node nobody holds goes, with any (equally tenantless) children below it.
            node.parent.children.pop(node.text[0], None)
