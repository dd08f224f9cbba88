"""What a deploy adds around an apply: rehearsal on a copy, the plan an approver reads, restore in place."""
