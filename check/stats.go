package check

import (
	"slices"
	"time"
)

// Dist summarises a set of durations.
type Dist struct {
	N             int
	P50, P99, Max time.Duration
}

// Percentiles returns the median, 99th percentile and maximum of ds
// (nearest rank). ds is not modified.
func Percentiles(ds []time.Duration) Dist {
	if len(ds) == 0 {
		return Dist{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return Dist{N: len(s), P50: s[rank(len(s), 50)], P99: s[rank(len(s), 99)], Max: s[len(s)-1]}
}

// rank is the index of the p-th percentile of n sorted values (nearest
// rank: the smallest value with at least p% of the values at or below it).
func rank(n, p int) int {
	i := (n*p+99)/100 - 1
	return max(0, min(i, n-1))
}
