package control

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// peerAllowed accepts a connection from root or from our own user only,
// whatever the socket file's mode: Listen makes it 0600 before it has its
// name, but a later chmod by an administrator should not open it to all.
func peerAllowed(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	if !uidAllowed(cred.Uid, os.Geteuid()) {
		return fmt.Errorf("uid %d (pid %d) is neither root nor uid %d", cred.Uid, cred.Pid, os.Geteuid())
	}
	return nil
}
